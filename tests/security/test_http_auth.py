"""Who may call the hub: every operation of its OpenAPI document tried by a stranger, by a
read-scope token, by an agent's certificate, and by clients with the wrong TLS credentials.

The hub runs as in production: HTTPS with a server certificate from the fleet CA, client
certificates requested (optional) and verified against that CA, an admin and a read token.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.hub_client import (
    AUTH,
    READ_AUTH,
    InProcessHub,
    client_ssl,
    default_pki,
    hub_session,
    hub_settings,
    running_hub,
    stored_files,
    upload_form,
)
from tests.support.hub_models import write_model
from tests.support.pki import TestPki

#: Paths anyone may read: liveness, readiness (the kubelet asks without a token; it says only
#: whether the database answers and whether this replica leads) and the API's own description.
OPEN = {("get", "/healthz"), ("get", "/readyz"), ("get", "/v1/openapi.json")}
#: The fleet page and its static files: public like any login page, they hold no data (every
#: figure on the page comes from the API with the person's token).
PAGE = {("get", "/"), ("get", "/ui/{name}")}
#: The page's live stream: authenticated, and it does not end, so only its status is read.
STREAM = "/v1/stream"
#: The certificate bootstrap answers to a pod's ServiceAccount token, never to the hub's API
#: tokens or certificates (tests/security/test_bootstrap.py tries it).
BOOTSTRAP = "/v1/pki/"
_PARAMS = {"name": "tiny", "version": "1", "id": "1", "node": "n1", "command": "pause"}


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[InProcessHub]:
    async with running_hub(hub_settings(tmp_path / "data")) as h, \
            hub_session(headers=AUTH) as admin:
        onnx, manifest = write_model(tmp_path / "m")
        async with admin.put(f"{h.url}/v1/models/tiny/versions/1",
                             data=upload_form(onnx, manifest)) as r:
            assert r.status == 201
        yield h


async def _operations(hub: InProcessHub) -> list[tuple[str, str]]:
    """(method, concrete path) of every documented operation but the open ones."""
    async with hub_session() as http, http.get(hub.url + "/v1/openapi.json") as r:
        doc = await r.json()
    ops = []
    for path, item in doc["paths"].items():
        for method in item:
            if method in ("get", "put", "post", "delete") and (method, path) not in OPEN \
                    and (method, path) not in PAGE and not path.startswith(BOOTSTRAP):
                ops.append((method, re.sub(r"\{(\w+)\}", lambda m: _PARAMS[m[1]], path)))
    assert len(ops) == 14, ops  # 6 registry, 6 fleet, /metrics, the page's stream
    return ops


async def _call(http: aiohttp.ClientSession, hub: InProcessHub, method: str,
                path: str, **kw: Any) -> tuple[int, Any]:
    body = {"data": b"{}", "headers": {"Content-Type": "application/json"}} \
        if method in ("post", "put") else {}
    async with http.request(method.upper(), hub.url + path, **body, **kw) as r:
        if path == STREAM and r.status == 200:
            return r.status, None  # an open stream: its status is the answer
        raw = await r.read()
        return r.status, json.loads(raw) if r.content_type == "application/json" else raw


async def test_strangers_get_401_on_every_read_and_write(hub: InProcessHub) -> None:
    ops = await _operations(hub)
    async with hub_session() as stranger:
        for method, path in ops:
            status, body = await _call(stranger, hub, method, path)
            assert status == 401, (method, path, status, body)
            assert body["error"]["code"] == "unauthorized"
        for bad in ("Bearer nope", "Bearer ", "Basic YWRtaW46YWRtaW4=", "bearer"):
            status, _ = await _call(stranger, hub, "get", "/v1/models",
                                    headers={"Authorization": bad})
            assert status == 401, bad
        for method, path in OPEN:
            assert (await _call(stranger, hub, method, path))[0] == 200
        for path in ("/", "/ui/app.js"):  # the page itself: static, no data in it
            status, raw = await _call(stranger, hub, "get", path)
            assert status == 200 and b"tiny" not in raw, path


async def test_a_read_token_reads_but_cannot_push_delete_or_roll_out(
    hub: InProcessHub, tmp_path: Path,
) -> None:
    before = stored_files(hub.data_dir)
    async with hub_session(headers=READ_AUTH) as ci:
        for method, path in await _operations(hub):
            status, body = await _call(ci, hub, method, path)
            if method == "get":
                assert status not in (401, 403), (path, status, body)
            else:
                assert status == 403, (method, path, status, body)
                assert body["error"]["code"] == "forbidden"
                assert "scope read" in body["error"]["message"]
        onnx, manifest = write_model(tmp_path / "m2", version="2")
        async with ci.put(f"{hub.url}/v1/models/tiny/versions/2",
                          data=upload_form(onnx, manifest)) as r:
            assert r.status == 403
        async with ci.delete(f"{hub.url}/v1/models/tiny/versions/1") as r:
            assert r.status == 403
        async with ci.post(f"{hub.url}/v1/rollouts", json={"model": "tiny", "version": "1",
                                                           "selector": "site=a"}) as r:
            assert r.status == 403
        async with ci.get(f"{hub.url}/v1/models/tiny/versions/1") as r:
            assert r.status == 200  # still there
    assert stored_files(hub.data_dir) == before


async def test_an_agent_certificate_downloads_models_and_nothing_else(
    hub: InProcessHub,
) -> None:
    node = default_pki().identity("edge-07", "agent")
    async with hub_session(node) as agent:
        for method, path in await _operations(hub):
            status, body = await _call(agent, hub, method, path)
            if method == "get" and path.startswith("/v1/models"):
                assert status == 200, (path, status, body)
            else:
                assert status == 403, (method, path, status, body)


async def test_tls_credentials_from_elsewhere_are_refused(hub: InProcessHub,
                                                          tmp_path: Path) -> None:
    port = int(hub.url.rsplit(":", 1)[1])
    # a client certificate from another CA: the handshake fails, nothing is served
    rogue = TestPki(tmp_path / "rogue").identity("edge-07", "agent")
    with pytest.raises((aiohttp.ClientError, ssl.SSLError)):
        async with hub_session(rogue) as http, http.get(hub.url + "/v1/models") as r:
            await r.read()
    # a client that does not know the fleet CA does not trust the hub (no token is sent)
    async with aiohttp.ClientSession() as naive:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await naive.get(hub.url + "/v1/models", headers=AUTH)
    # plain HTTP to the HTTPS port: no answer a client could take for the API's
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
    got = await asyncio.wait_for(reader.read(), timeout=10)
    writer.close()
    assert b"versions" not in got
    # and with the right CA but no credentials, the TLS works and the hub still says 401
    async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=client_ssl())) as http, \
            http.get(hub.url + "/v1/models") as r:
        assert r.status == 401
