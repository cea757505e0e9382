"""The model cache and its downloader, against a real HTTP server with injected faults."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import random
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.config import HubClientSettings
from edge_agent.contract.protocol import DesiredModel, signing_payload
from edge_agent.errors import ModelError, ModelRejectedError, TemporaryError
from edge_agent.modelsync.cache import ModelCache
from edge_agent.modelsync.fetch import Fetcher, FetchStats
from tests.support.fileserver import FileServer
from tests.support.hub_client import write_secret

MiB = 1024 * 1024


def _publish(server: FileServer, name: str, version: str, size: int = 300_000,
             **manifest_over: object) -> tuple[DesiredModel, bytes]:
    """Put an artifact + manifest on the server; return the desired entry naming them."""
    blob = random.Random(f"{name}{version}").randbytes(size)
    sha = hashlib.sha256(blob).hexdigest()
    manifest = {"name": name, "version": version, "task": "classification",
                "file": f"{name}.onnx", "sha256": sha}
    manifest.update(manifest_over)
    mbytes = json.dumps(manifest).encode()
    server.files[f"{name}-{version}.onnx"] = blob
    server.files[f"{name}-{version}.json"] = mbytes
    desired = DesiredModel(version=version, sha256=sha, url=server.url(f"{name}-{version}.onnx"),
                           manifest_url=server.url(f"{name}-{version}.json"))
    return desired, blob


class FakeSleep:
    """Records backoff waits instead of sleeping (time-dependent logic without wall-clock)."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def _cache(tmp_path: Path, fetcher: Fetcher | None = None, **over: object) -> ModelCache:
    settings = HubClientSettings(cache_dir=tmp_path / "cache", **over)  # type: ignore[arg-type]
    return ModelCache(settings, fetcher=fetcher)


def _fetcher(sleep: FakeSleep, **over: object) -> Fetcher:
    limits = HubClientSettings(**{"download_retries": 3, "stall_timeout_s": 5.0,
                                  "download_timeout_s": 20.0, **over})  # type: ignore[arg-type]
    return Fetcher(limits, sleep=sleep, rng=random.Random(1))


async def test_fetch_installs_verified_entry_and_hits_cache(
    tmp_path: Path, server: FileServer
) -> None:
    cache = _cache(tmp_path)
    desired, blob = _publish(server, "det", "1")
    entry = await cache.fetch("det", desired)
    assert entry.sha256 == desired.sha256
    assert (entry.path / "det.onnx").read_bytes() == blob
    assert json.loads(entry.manifest_path.read_text())["sha256"] == desired.sha256
    assert not list((cache.root / ".partial").iterdir())
    n = len(server.requests)
    again = await cache.fetch("det", desired)
    assert again.path == entry.path and len(server.requests) == n  # no download
    assert cache.get("det", "1", "0" * 64) is None  # another digest is another artifact


async def test_wrong_sha256_is_refused_and_nothing_installed(
    tmp_path: Path, server: FileServer
) -> None:
    cache = _cache(tmp_path)
    desired, _ = _publish(server, "det", "1")
    server.files["det-1.onnx"] = b"something else entirely"
    with pytest.raises(ModelRejectedError, match="sha256 mismatch"):
        await cache.fetch("det", desired)
    assert cache.get("det", "1") is None
    assert not list((cache.root / ".partial").iterdir())


async def test_manifest_for_another_artifact_is_refused_before_download(
    tmp_path: Path, server: FileServer
) -> None:
    cache = _cache(tmp_path)
    desired, _ = _publish(server, "det", "1", sha256="ab" * 32)
    with pytest.raises(ModelRejectedError, match="manifest sha256"):
        await cache.fetch("det", desired)
    assert [r[0] for r in server.requests] == ["det-1.json"]


@pytest.mark.parametrize("fname", ["../escape.onnx", "a/b.onnx", "", "entry.json"])
async def test_manifest_file_names_that_escape_are_refused(
    tmp_path: Path, server: FileServer, fname: str
) -> None:
    cache = _cache(tmp_path)
    desired, _ = _publish(server, "det", "1", file=fname)
    with pytest.raises(ModelRejectedError, match="unusable file"):
        await cache.fetch("det", desired)


async def test_cut_download_resumes_with_range(tmp_path: Path, server: FileServer) -> None:
    sleep = FakeSleep()
    cache = _cache(tmp_path, fetcher=_fetcher(sleep))
    desired, blob = _publish(server, "det", "1", size=3 * MiB)
    server.cut_after, server.cut_times = MiB + 123, 1
    stats = FetchStats()
    entry = await cache.fetch("det", desired, stats=stats)
    assert (entry.path / "det.onnx").read_bytes() == blob
    ranges = [h.get("Range") for n, h in server.requests if n == "det-1.onnx"]
    assert ranges[0] is None
    assert ranges[1] is not None and ranges[1].startswith("bytes=")
    start = int(ranges[1][6:-1])
    assert 0 < start <= MiB + 123 and stats.resumed_from == [start]
    assert len(sleep.waits) == 1


async def test_partial_file_from_a_previous_run_is_resumed(
    tmp_path: Path, server: FileServer
) -> None:
    cache = _cache(tmp_path)
    desired, blob = _publish(server, "det", "1")
    part = cache.root / ".partial" / f"{desired.sha256}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(blob[:100_000])
    entry = await cache.fetch("det", desired)
    assert (entry.path / "det.onnx").read_bytes() == blob
    art = [h for n, h in server.requests if n == "det-1.onnx"]
    assert [h.get("Range") for h in art] == ["bytes=100000-"]


async def test_a_partial_file_that_is_too_long_starts_over(
    tmp_path: Path, server: FileServer
) -> None:
    cache = _cache(tmp_path, fetcher=_fetcher(FakeSleep()))
    desired, blob = _publish(server, "det", "1")
    part = cache.root / ".partial" / f"{desired.sha256}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(blob + b"junk")
    entry = await cache.fetch("det", desired)
    assert (entry.path / "det.onnx").read_bytes() == blob


async def test_temporary_errors_are_retried_with_jittered_backoff(
    tmp_path: Path, server: FileServer
) -> None:
    sleep = FakeSleep()
    cache = _cache(tmp_path, fetcher=_fetcher(sleep, retry_min_s=0.5, retry_max_s=4.0))
    desired, _ = _publish(server, "det", "1")
    server.fail_next = 3  # manifest fails 3 times, then everything works
    await cache.fetch("det", desired)
    assert len(sleep.waits) == 3
    for k, w in enumerate(sleep.waits):
        assert 0.0 <= w <= min(4.0, 0.5 * 2**k)


async def test_retries_are_bounded(tmp_path: Path, server: FileServer) -> None:
    sleep = FakeSleep()
    cache = _cache(tmp_path, fetcher=_fetcher(sleep, download_retries=2))
    desired, _ = _publish(server, "det", "1")
    server.fail_next = 100
    with pytest.raises(TemporaryError, match="3 attempts"):
        await cache.fetch("det", desired)
    assert len(server.requests) == 3 and len(sleep.waits) == 2


async def test_not_found_is_permanent_and_not_retried(
    tmp_path: Path, server: FileServer
) -> None:
    sleep = FakeSleep()
    cache = _cache(tmp_path, fetcher=_fetcher(sleep))
    desired, _ = _publish(server, "det", "1")
    del server.files["det-1.onnx"]
    with pytest.raises(ModelError, match="HTTP 404") as info:
        await cache.fetch("det", desired)
    assert not isinstance(info.value, TemporaryError)
    assert sleep.waits == []


async def test_total_timeout_bounds_a_hanging_hub(tmp_path: Path) -> None:
    # a listening socket that never answers: the connection succeeds, the response never comes
    writers: list[asyncio.StreamWriter] = []

    async def hang(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        writers.append(w)

    srv = await asyncio.start_server(hang, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        cache = _cache(tmp_path, fetcher=_fetcher(FakeSleep(), download_timeout_s=0.5,
                                                  stall_timeout_s=30.0))
        base = f"http://127.0.0.1:{port}"
        desired = DesiredModel(version="1", sha256="ab" * 32, url=f"{base}/a",
                               manifest_url=f"{base}/m")
        with pytest.raises(TemporaryError, match="not fetched within"):
            await cache.fetch("det", desired)
    finally:
        for w in writers:
            w.close()
            await w.wait_closed()
        srv.close()
        await srv.wait_closed()


async def test_bearer_token_comes_from_token_file(tmp_path: Path, server: FileServer) -> None:
    token_file = write_secret(tmp_path / "token", "s3cret")
    server.token = "s3cret"
    cache = _cache(tmp_path, token_file=token_file)
    desired, _ = _publish(server, "det", "1")
    await cache.fetch("det", desired)
    token_file.write_text("wrong\n")
    desired2, _ = _publish(server, "det", "2")
    with pytest.raises(ModelError, match="HTTP 401"):
        await cache.fetch("det", desired2)
    token_file.chmod(0o644)  # readable by every account on the box: refused, never sent
    n = len(server.requests)
    with pytest.raises(ModelError, match="readable by other users"):
        await cache.fetch("det", desired2)
    assert len(server.requests) == n


def _keypair(tmp_path: Path) -> tuple[Ed25519PrivateKey, Path]:
    key = Ed25519PrivateKey.generate()
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    path = tmp_path / "pub.pem"
    path.write_bytes(pem)
    return key, path


async def test_signature_is_checked_before_the_artifact_is_downloaded(
    tmp_path: Path, server: FileServer
) -> None:
    key, pub = _keypair(tmp_path)
    cache = _cache(tmp_path, public_key_file=pub)
    desired, _ = _publish(server, "det", "1")
    with pytest.raises(ModelRejectedError, match="not signed"):
        await cache.fetch("det", desired)
    other = Ed25519PrivateKey.generate()
    mbytes = server.files["det-1.json"]
    msha = hashlib.sha256(mbytes).hexdigest()
    bad = base64.b64encode(other.sign(signing_payload(msha, desired.sha256))).decode()
    with pytest.raises(ModelRejectedError, match="does not verify"):
        await cache.fetch("det", desired.model_copy(update={"signature": bad}))
    assert all(n == "det-1.json" for n, _ in server.requests)
    good = base64.b64encode(key.sign(signing_payload(msha, desired.sha256))).decode()
    entry = await cache.fetch("det", desired.model_copy(update={"signature": good}))
    assert entry.manifest_sha256 == msha
    # a cache hit is checked too: a stored artifact is not trusted under a wrong signature
    with pytest.raises(ModelRejectedError, match="does not verify"):
        await cache.fetch("det", desired.model_copy(update={"signature": bad}))


async def test_prune_keeps_active_and_previous_and_drops_least_recently_used(
    tmp_path: Path, server: FileServer
) -> None:
    cache = _cache(tmp_path, cache_max_bytes=MiB * 2, keep_previous=1)
    entries = {}
    for v in ("1", "2", "3"):
        desired, _ = _publish(server, "det", v, size=600_000)
        entries[v] = await cache.fetch("det", desired)
        os.utime(entries[v].path / "entry.json")
    cache.save_state({"models": {"det": {"active": "2", "active_sha256": entries["2"].sha256,
                                         "active_source": "hub", "previous": ["1"]}}})
    cache.touch(entries["3"])
    desired4, _ = _publish(server, "det", "4", size=600_000)
    await cache.fetch("det", desired4)
    kept = {e.version for e in cache.entries()}
    # budget 2 MiB holds three 600 kB versions: 3 (least recently used unprotected) goes
    assert kept == {"1", "2", "4"}
    assert cache.last_good("det") == entries["2"]


def test_prune_removes_crash_debris(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    (cache.root / "det" / ".1.abcd.tmp").mkdir(parents=True)
    (cache.root / "det" / "2").mkdir()
    (cache.root / "det" / "2" / "det.onnx").write_bytes(b"x")
    cache.prune()
    assert list((cache.root / "det").iterdir()) == []


def test_last_good_ignores_missing_and_config_versions(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    assert cache.last_good("det") is None
    cache.save_state({"models": {"det": {"active": "1", "active_source": "hub"}}})
    assert cache.last_good("det") is None  # not in the cache
    (cache.root / "sync-state.json").write_text("{not json")
    assert cache.load_state() == {}


async def test_large_manifest_arrives_whole_and_oversize_is_refused(
    tmp_path: Path, server: FileServer
) -> None:
    cache = _cache(tmp_path)
    labels = [f"label-{i:05d}-" + "x" * 80 for i in range(4000)]  # ~360 kB, many chunks
    desired, _ = _publish(server, "det", "1", labels=labels)
    entry = await cache.fetch("det", desired)
    assert json.loads(entry.manifest_path.read_text())["labels"] == labels
    huge, _ = _publish(server, "det", "2", labels=labels * 4)  # > 1 MiB
    with pytest.raises(ModelError, match=r"too big|larger than"):
        await cache.fetch("det", huge)
