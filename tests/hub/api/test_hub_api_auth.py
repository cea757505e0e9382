"""Who may read and write the registry, on hubs of the tests' own: reads need a token or an
agent's certificate unless opened, a hub without an admin token refuses every write, and a hub
that requires signatures refuses unsigned or foreign-signed versions."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from hub.registry import signing
from tests.support.hub_client import (
    AUTH,
    READ_AUTH,
    default_pki,
    hub_session,
    hub_settings,
    push,
    running_hub,
    stored_files,
    version_url,
)
from tests.support.hub_models import sha256_file, write_model


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client of the test hubs: their CA trusted, the read token by default."""
    async with hub_session(headers=READ_AUTH) as s:
        yield s


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[Path, Path]:
    """A model named ``tiny``."""
    return write_model(tmp_path / "m")


def v_url(hub: Any, version: str = "1", tail: str = "") -> str:
    return version_url(hub.url, "tiny", version, tail)


async def test_reads_need_a_token_or_an_agent_certificate(
    tmp_path: Path, tiny: tuple[Path, Path]
) -> None:
    settings = hub_settings(tmp_path / "data")
    node = default_pki().identity("node-a", "agent")
    consumer = default_pki().identity("consumer:dash", "consumer")
    async with running_hub(settings) as hub, hub_session(headers=AUTH) as admin:
        assert (await push(admin, v_url(hub), *tiny))[0] == 201
        async with hub_session() as anonymous:
            for path in ("/v1/models", v_url(hub, tail="/artifact"), "/v1/nodes", "/metrics"):
                async with anonymous.get(path if "://" in path else hub.url + path) as r:
                    assert r.status == 401, path
            for open_path in ("/v1/openapi.json", "/healthz"):
                async with anonymous.get(hub.url + open_path) as r:
                    assert r.status == 200
        async with hub_session(node) as agent:  # the certificate downloads models, no more
            async with agent.get(v_url(hub, tail="/artifact")) as r:
                assert r.status == 200 and await r.read() == tiny[0].read_bytes()
            async with agent.get(hub.url + "/v1/nodes") as r:
                assert r.status == 403 and (await r.json())["error"]["code"] == "forbidden"
        # another role's certificate is nobody here
        async with hub_session(consumer) as other, other.get(hub.url + "/v1/models") as r:
            assert r.status == 401


async def test_reads_can_be_opened(tmp_path: Path, tiny: tuple[Path, Path]) -> None:
    settings = hub_settings(tmp_path / "data", read_requires_token=False)
    async with running_hub(settings) as hub, hub_session() as anonymous:
        async with anonymous.get(f"{hub.url}/v1/models") as r:
            assert r.status == 200
        status, body = await push(anonymous, v_url(hub), *tiny, headers={})
        assert status == 401 and body["error"]["code"] == "unauthorized"


async def test_hub_without_token_refuses_writes(
    tmp_path: Path, http: aiohttp.ClientSession, tiny: tuple[Path, Path]
) -> None:
    settings = hub_settings(tmp_path / "data", token=None)
    async with running_hub(settings) as hub:
        status, body = await push(http, v_url(hub), *tiny)
        assert status == 401 and "no admin API token" in body["error"]["message"]


async def test_signed_uploads(
    tmp_path: Path, http: aiohttp.ClientSession, tiny: tuple[Path, Path]
) -> None:
    priv, pub = signing.generate_keypair()
    (tmp_path / "k.pub").write_bytes(pub)
    key = signing.load_private_key(_write(tmp_path / "k.key", priv))
    stranger = signing.load_private_key(_write(tmp_path / "s.key", signing.generate_keypair()[0]))
    settings = hub_settings(tmp_path / "data")
    settings.signing = settings.signing.model_validate(
        {"require_signed": True, "public_key_files": [tmp_path / "k.pub"]})
    onnx_path, manifest_path = tiny
    sha, msha = sha256_file(onnx_path), hashlib.sha256(manifest_path.read_bytes()).hexdigest()
    async with running_hub(settings) as hub:
        status, body = await push(http, v_url(hub), onnx_path, manifest_path)
        assert status == 422 and body["error"]["code"] == "signature_rejected"
        bad = signing.sign(stranger, msha, sha)
        status, body = await push(http, v_url(hub), onnx_path, manifest_path, signature=bad)
        assert status == 422 and body["error"]["code"] == "signature_rejected"
        # a signature made for the original bytes does not cover a flipped byte
        good = signing.sign(key, msha, sha)
        flipped = bytearray(onnx_path.read_bytes())
        flipped[len(flipped) // 2] ^= 0x01
        man = json.loads(manifest_path.read_bytes())
        man["sha256"] = hashlib.sha256(flipped).hexdigest()
        status, body = await push(http, v_url(hub), bytes(flipped), json.dumps(man).encode(),
                                  signature=good)
        assert status == 422 and body["error"]["code"] == "signature_rejected"
        assert stored_files(hub.data_dir) == set()
        status, body = await push(http, v_url(hub), onnx_path, manifest_path, signature=good)
        assert status == 201 and body["signature"] == good and body["signed"] is True
        # round trip: what the hub serves verifies with the public key
        async with http.get(v_url(hub, tail="/manifest")) as r:
            served_msha = hashlib.sha256(await r.read()).hexdigest()
        async with http.get(v_url(hub, tail="/artifact")) as r:
            served = await r.read()
        pub_key = signing.load_public_key(tmp_path / "k.pub")
        assert signing.verify([pub_key], body["signature"], served_msha,
                              hashlib.sha256(served).hexdigest())
        served_flipped = bytearray(served)
        served_flipped[0] ^= 0x80
        assert not signing.verify([pub_key], body["signature"], served_msha,
                                  hashlib.sha256(served_flipped).hexdigest())


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
