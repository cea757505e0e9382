"""The registry below HTTP: validation of real models, immutability under races, shared blobs,
crash leftovers, persistence, signing, and an event loop that never blocks."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import time
from pathlib import Path

import pytest
from blockbuster import blockbuster_ctx

from hub.config import ConfigError, HubSettings
from hub.errors import Conflict, InvalidRequest, NotFound
from hub.registry import signing
from hub.registry.service import SHARED_SWEEP_AGE_S, Registry
from hub.registry.validation import ManifestMismatch
from tests.support.hub_client import (
    AUTH,
    READ_AUTH,
    hub_session,
    hub_settings,
    running_hub,
    stored_files,
    upload_form,
)
from tests.support.hub_models import write_model


async def _push(reg: Registry, onnx: Path, manifest: Path, name: str = "tiny",
                version: str = "1", **kw: str) -> tuple[object, bool]:
    data, mbytes = await asyncio.to_thread(lambda: (onnx.read_bytes(), manifest.read_bytes()))
    staged = await reg.stage()
    await staged.write(data)
    await staged.finish()
    return await reg.push(name, version, manifest_bytes=mbytes, staged=staged, **kw)


@pytest.fixture
async def registry(tmp_path: Path) -> Registry:
    reg = Registry(hub_settings(tmp_path / "data"))
    yield reg  # type: ignore[misc]
    await reg.aclose()


GOOD = ("tiny-classifier", "yolov8-head", "centerface")
BAD = ("bad-input-mismatch", "bad-output-mismatch")


async def test_generated_models_are_accepted_and_mismatched_ones_refused(
    registry: Registry, models_dir: Path
) -> None:
    for name in GOOD:
        d = models_dir / name
        m = json.loads((d / "manifest.json").read_bytes())
        v, created = await _push(registry, d / m["file"], d / "manifest.json", m["name"],
                                 m["version"])
        assert created and v.sha256 == m["sha256"]  # type: ignore[attr-defined]
    for name in BAD:
        d = models_dir / name
        m = json.loads((d / "manifest.json").read_bytes())
        with pytest.raises(ManifestMismatch):
            await _push(registry, d / m["file"], d / "manifest.json", m["name"], m["version"])
    assert sorted(v.name for v in await registry.list()) == sorted(
        json.loads((models_dir / n / "manifest.json").read_bytes())["name"] for n in GOOD)


async def test_concurrent_pushes_of_one_version_one_wins(
    registry: Registry, tmp_path: Path
) -> None:
    a = write_model(tmp_path / "a", seed=1)
    b = write_model(tmp_path / "b", seed=2)
    results = await asyncio.gather(
        _push(registry, *a), _push(registry, *b), return_exceptions=True
    )
    assert sorted(type(r).__name__ for r in results) == ["Conflict", "tuple"]
    winner = next(r for r in results if isinstance(r, tuple))
    assert len(stored_files(registry.settings.storage.data_dir)) == 1
    v = await registry.get("tiny", "1")
    assert v.sha256 == winner[0].sha256  # type: ignore[attr-defined]


async def test_versions_share_a_blob_until_the_last_is_deleted(
    registry: Registry, tmp_path: Path
) -> None:
    onnx, _ = write_model(tmp_path / "m")
    for version in ("1", "2"):
        man = json.loads((tmp_path / "m" / "tiny-1.json").read_bytes())
        man["version"] = version
        mpath = tmp_path / f"man-{version}.json"
        mpath.write_text(json.dumps(man))
        await _push(registry, onnx, mpath, version=version)
    data_dir = registry.settings.storage.data_dir
    assert len(stored_files(data_dir)) == 1
    await registry.delete("tiny", "1")
    v2 = await registry.get("tiny", "2")
    assert registry.blob_path(v2).read_bytes() == onnx.read_bytes()
    await registry.delete("tiny", "2")
    assert stored_files(data_dir) == set()
    with pytest.raises(NotFound):
        await registry.get("tiny", "2")


async def test_restart_keeps_versions_and_sweeps_crash_leftovers(tmp_path: Path) -> None:
    settings = hub_settings(tmp_path / "data")
    onnx, manifest = write_model(tmp_path / "m")
    reg = Registry(settings)
    await _push(reg, onnx, manifest)
    await reg.aclose()
    data_dir = settings.storage.data_dir
    orphan = data_dir / "artifacts" / "sha256" / "ab" / ("ab" * 32)
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"left by a crash between blob and row")
    (data_dir / "tmp" / "upload-dead.part").write_bytes(b"half an upload")
    fresh = data_dir / "artifacts" / "sha256" / "cd" / ("cd" * 32)
    fresh.parent.mkdir(parents=True, exist_ok=True)
    fresh.write_bytes(b"another replica's upload, between its blob and its row")
    shared = settings.storage.database_url is not None
    if shared:  # replicas share the folder: only leftovers older than an hour go
        old = time.time() - SHARED_SWEEP_AGE_S - 60
        for p in (orphan, data_dir / "tmp" / "upload-dead.part"):
            os.utime(p, (old, old))
    reg = Registry(settings)
    try:
        v = await reg.get("tiny", "1")
        assert reg.blob_path(v).read_bytes() == onnx.read_bytes()
        assert not orphan.exists()
        assert list((data_dir / "tmp").iterdir()) == []
        assert fresh.exists() == shared
    finally:
        await reg.aclose()


async def test_immutability_and_patterns(registry: Registry, tmp_path: Path) -> None:
    onnx, manifest = write_model(tmp_path / "m")
    assert (await _push(registry, onnx, manifest))[1] is True
    assert (await _push(registry, onnx, manifest))[1] is False  # exact repeat
    man = json.loads(manifest.read_bytes())
    man["labels"] = ["a", "b", "c", "d"]
    other = tmp_path / "other.json"
    other.write_text(json.dumps(man))
    with pytest.raises(Conflict, match="manifest"):
        await _push(registry, onnx, other)
    for name, version in [("../x", "1"), ("tiny", "../1"), ("tiny", "1/2"), ("UP", "1"),
                          ("tiny", "a..b"), ("", "1"), ("tiny", "")]:
        with pytest.raises(InvalidRequest):
            await registry.get(name, version)
        with pytest.raises(InvalidRequest):
            await _push(registry, onnx, manifest, name=name, version=version)


async def test_require_signed_needs_a_key(tmp_path: Path) -> None:
    settings = hub_settings(tmp_path / "data")
    settings.signing = settings.signing.model_validate({"require_signed": True})
    reg = Registry(settings)
    with pytest.raises(ConfigError, match="public_key_files"):
        await reg.open()


def test_signature_round_trip_and_flipped_bytes(tmp_path: Path) -> None:
    priv_pem, pub_pem = signing.generate_keypair()
    (tmp_path / "k.key").write_bytes(priv_pem)
    (tmp_path / "k.pub").write_bytes(pub_pem)
    key = signing.load_private_key(tmp_path / "k.key")
    pub = [signing.load_public_key(tmp_path / "k.pub")]
    msha = hashlib.sha256(b"manifest").hexdigest()
    sha = hashlib.sha256(b"model").hexdigest()
    sig = signing.sign(key, msha, sha)
    assert signing.verify(pub, sig, msha, sha)
    assert not signing.verify(pub, sig, msha, hashlib.sha256(b"modem").hexdigest())
    assert not signing.verify(pub, sig, sha, msha)
    raw = bytearray(base64.b64decode(sig))
    raw[10] ^= 0x04
    assert not signing.verify(pub, base64.b64encode(bytes(raw)).decode(), msha, sha)
    with pytest.raises(InvalidRequest):
        signing.verify(pub, "c2hvcnQ=", msha, sha)
    with pytest.raises(signing.SigningKeyError):
        signing.load_private_key(tmp_path / "k.pub")


async def test_push_and_download_never_block_the_event_loop(tmp_path: Path) -> None:
    """blockbuster raises in the loop thread on blocking file, socket and sleep calls."""
    onnx, manifest = write_model(tmp_path / "m")
    settings: HubSettings = hub_settings(tmp_path / "data")
    async with running_hub(settings) as hub, hub_session(headers=READ_AUTH) as http:
        data, mbytes = onnx.read_bytes(), manifest.read_bytes()
        with blockbuster_ctx():
            url = f"{hub.url}/v1/models/tiny/versions/1"
            async with http.put(url, data=upload_form(data, mbytes),
                                headers=AUTH) as r:
                assert r.status == 201, await r.text()
            async with http.get(url + "/artifact", headers={"Range": "bytes=3-"}) as r:
                assert await r.read() == data[3:]
            async with http.delete(url, headers=AUTH) as r:
                assert r.status == 200
