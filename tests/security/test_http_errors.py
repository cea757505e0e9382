"""What both HTTP servers answer to requests they cannot parse: a JSON error like every other,
the connection closed, nothing of the request echoed, and no versions in ``Server``."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edge_agent.app.compose import Agent
from tests.support.broker import free_port
from tests.support.hub_client import client_ssl, hub_settings, running_hub
from tests.support.pipeline import RecordingSink, agent_settings


@pytest.fixture(params=["hub", "agent"])
async def endpoint(request: pytest.FixtureRequest, tmp_path: Path,
                   models_dir: Path) -> AsyncIterator[tuple[str, int, ssl.SSLContext | None]]:
    if request.param == "hub":
        async with running_hub(hub_settings(tmp_path / "data")) as hub:
            yield "edge-hub", int(hub.url.rsplit(":", 1)[1]), client_ssl()
    else:
        s = agent_settings(tmp_path, models_dir, [], models=("tiny-classifier",),
                           http={"host": "127.0.0.1", "port": free_port()})
        agent = Agent(s, sink=RecordingSink())
        await agent.start()
        try:
            yield "edge-agent", s.http.port, None
        finally:
            await agent.stop()


async def _exchange(port: int, tls: ssl.SSLContext | None, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls)
    writer.write(raw)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()


def _parse(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


@pytest.mark.parametrize("raw", [
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nno colon here <script>\r\n\r\n",
    b"G<E>T /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 70 + b"\r\n",
    b"\x00\x01<script>junk that is no HTTP at all\r\n\r\n",
], ids=["bad-header", "bad-method", "long-header", "many-headers", "junk"])
async def test_unparsable_requests_get_a_json_error(
    endpoint: tuple[str, int, ssl.SSLContext | None], raw: bytes,
) -> None:
    name, port, tls = endpoint
    answer = await _exchange(port, tls, raw)  # returns only once the server closed
    got, headers, body = _parse(answer)
    assert got == 400
    assert headers["content-type"].startswith("application/json")
    assert headers["server"] == name  # the program, no version
    err = json.loads(body)["error"]
    assert err["code"] in ("invalid_request", "bad_request") and err["message"]
    assert b"<script>" not in body and b"aiohttp" not in body


async def test_no_version_in_any_server_header(
    endpoint: tuple[str, int, ssl.SSLContext | None],
) -> None:
    name, port, tls = endpoint
    for path in ("/healthz", "/nope", "/metrics"):
        got, headers, _ = _parse(await _exchange(
            port, tls, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()))
        assert headers["server"] == name, (path, headers)
        assert "aiohttp" not in json.dumps(headers) and "Python" not in json.dumps(headers)
        if got >= 400:
            assert headers["content-type"].startswith("application/json"), path
