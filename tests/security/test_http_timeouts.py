"""Slow and idle clients against both HTTP servers: each is closed within its timeout.

Raw connections on loopback (asyncio streams: the servers run in this event loop), TLS to the
hub as any client would speak it. The servers run with the limits below instead of the
defaults (idle 30 s, header 10 s, body 30 s + 1 s per 16 KiB, 256/64 connections), so the
tests take seconds; the attacker sends a byte every 50 ms (20 B/s), far below the body's
minimum rate of 1000 B/s, and keeps sending until the server hangs up.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from edge_agent.app.compose import Agent
from hub.server.app import GATE_KEY
from tests.support.broker import free_port
from tests.support.hub_client import (
    AUTH,
    READ_AUTH,
    client_ssl,
    hub_session,
    hub_settings,
    running_hub,
)
from tests.support.pipeline import RecordingSink, agent_settings
from tests.support.waiting import until

LIMITS = {"idle_timeout_s": 0.6, "header_timeout_s": 0.6, "body_timeout_s": 0.6,
          "body_min_bytes_per_s": 1000}
#: Slack for a loaded test machine between the deadline and the hang-up seen by the client.
SLACK_S = 1.5
DRIP_S = 0.05

Script = Callable[[asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Server:
    name: str
    host: str
    port: int
    tls: ssl.SSLContext | None
    #: A request whose body the server reads (method, path, extra headers).
    upload: tuple[str, str, str]


@pytest.fixture(params=["hub", "agent"])
async def server(request: pytest.FixtureRequest, tmp_path: Path,
                 models_dir: Path) -> AsyncIterator[Server]:
    if request.param == "hub":
        settings = hub_settings(tmp_path / "data", **LIMITS)
        async with running_hub(settings) as hub:
            port = int(hub.url.rsplit(":", 1)[1])
            yield Server("hub", "127.0.0.1", port, client_ssl(),
                         ("POST", "/v1/rollouts", f"Authorization: Bearer {AUTH_TOKEN}\r\n"
                          "Content-Type: application/json\r\n"))
    else:
        s = agent_settings(tmp_path, models_dir, [], models=("tiny-classifier",),
                           http={"host": "127.0.0.1", "port": free_port(), **LIMITS})
        agent = Agent(s, sink=RecordingSink())
        await agent.start()
        try:
            yield Server("agent", "127.0.0.1", s.http.port, None,
                         ("POST", "/v1/infer?model=tiny-classifier",
                          "Content-Type: image/png\r\n"))
        finally:
            await agent.stop()


AUTH_TOKEN = AUTH["Authorization"].split()[1]


async def _until_closed(srv: Server, script: Script) -> tuple[float, bytes]:
    """Connect, run ``script`` (it may write forever); (seconds until the server hung up, what
    it sent before)."""
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection(srv.host, srv.port, ssl=srv.tls)
    t0 = loop.time()
    attacker = asyncio.create_task(script(writer))
    got = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), timeout=15):
            got += chunk
    except (ConnectionError, ssl.SSLError):
        pass
    took = loop.time() - t0
    attacker.cancel()
    await asyncio.gather(attacker, return_exceptions=True)
    writer.close()
    return took, got


async def _drip(writer: asyncio.StreamWriter, data: bytes) -> None:
    for i in range(len(data)):
        writer.write(data[i:i + 1])
        await writer.drain()
        await asyncio.sleep(DRIP_S)  # the attack's pace, not a wait for anything


def _within(took: float, limit: float) -> bool:
    print(f"closed after {took:.2f} s (limit {limit} s)")
    return limit * 0.8 <= took <= limit + SLACK_S


async def test_an_idle_connection_is_closed(server: Server) -> None:
    async def nothing(writer: asyncio.StreamWriter) -> None:
        await asyncio.Event().wait()

    took, got = await _until_closed(server, nothing)
    assert _within(took, LIMITS["idle_timeout_s"]), took
    assert got == b""


async def test_an_idle_keep_alive_connection_is_closed_after_its_response(
    server: Server,
) -> None:
    async def one_request_then_silence(writer: asyncio.StreamWriter) -> None:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        await asyncio.Event().wait()

    took, got = await _until_closed(server, one_request_then_silence)
    assert got.startswith(b"HTTP/1.1 200")  # served, then idle: closed
    assert took <= LIMITS["idle_timeout_s"] + SLACK_S, took


async def test_a_slow_request_head_is_closed(server: Server) -> None:
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 400 + b"\r\n\r\n"

    async def slow(writer: asyncio.StreamWriter) -> None:
        await _drip(writer, head)  # 20 s of head at this pace: never complete in time

    took, got = await _until_closed(server, slow)
    assert _within(took, LIMITS["header_timeout_s"]), took
    assert got == b""


async def test_a_slow_request_body_is_closed(server: Server) -> None:
    method, path, headers = server.upload
    head = (f"{method} {path} HTTP/1.1\r\nHost: x\r\n{headers}Content-Length: 5000\r\n\r\n"
            ).encode()

    async def slow(writer: asyncio.StreamWriter) -> None:
        writer.write(head)
        await writer.drain()
        await _drip(writer, b"\x89PNG\r\n\x1a\n" + b"0" * 4992)

    took, got = await _until_closed(server, slow)
    # 0.6 s plus 1 ms per byte received at 20 B/s: closed just after 0.6 s
    assert _within(took, LIMITS["body_timeout_s"]), took
    assert got == b""


async def test_connections_beyond_the_cap_get_503_and_the_rest_are_served(
    tmp_path: Path,
) -> None:
    settings = hub_settings(tmp_path / "data", max_connections=3, idle_timeout_s=30)
    async with running_hub(settings) as hub:
        port = int(hub.url.rsplit(":", 1)[1])
        held = [await asyncio.open_connection("127.0.0.1", port, ssl=client_ssl())
                for _ in range(3)]
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ssl())
        answer = await asyncio.wait_for(reader.read(), timeout=10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 503")
        assert b'"code":"too_many_connections"' in answer and b"Server: edge-hub" in answer
        for _, w in held:
            w.close()
            await w.wait_closed()
        stats = hub.app[GATE_KEY].stats
        await until(lambda: stats.open == 0, what="the held connections closed on the hub")
        async with hub_session(headers=READ_AUTH) as http, http.get(hub.url + "/metrics") as r:
            assert r.status == 200
            metrics = await r.text()
        assert 'edge_hub_http_connections_closed_total{reason="over_capacity"} 1.0' in metrics


async def test_a_stalled_tls_handshake_is_closed(tmp_path: Path) -> None:
    settings = hub_settings(tmp_path / "data", **LIMITS)
    async with running_hub(settings) as hub:
        port = int(hub.url.rsplit(":", 1)[1])
        bare = Server("hub", "127.0.0.1", port, None, ("", "", ""))  # TCP only, no ClientHello

        async def nothing(writer: asyncio.StreamWriter) -> None:
            await asyncio.Event().wait()

        took, got = await _until_closed(bare, nothing)
    assert _within(took, LIMITS["header_timeout_s"]), took
    assert got == b""
