"""The fleet page's routes on the real hub app (in-process, TLS, the guarded listener): the
change stream's auth, cap and shutdown, and the static files' headers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from hub.web import stream
from tests.support.hub_client import (
    READ_TOKEN,
    InProcessHub,
    client_ssl,
    hub_settings,
    running_hub,
)
from tests.support.waiting import until


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[InProcessHub]:
    async with running_hub(hub_settings(tmp_path / "data")) as h:
        yield h


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ssl())) as s:
        yield s


def auth(token: str = READ_TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def first_line(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    line = await asyncio.wait_for(resp.content.readline(), 10)
    return orjson.loads(line)  # type: ignore[no-any-return]


async def test_stream_refuses_unknown_callers_with_401_json(
        hub: InProcessHub, http: aiohttp.ClientSession) -> None:
    for headers in ({}, auth("wrong"), {"Authorization": "Basic eDp5"}):
        async with http.get(hub.url + "/v1/stream", headers=headers) as r:
            assert r.status == 401
            assert r.content_type == "application/json"
            assert (await r.json())["error"]["code"] == "unauthorized"
    assert hub.app[stream.WATCHER_KEY].readers == 0


async def test_stream_sends_a_snapshot_to_a_read_token(
        hub: InProcessHub, http: aiohttp.ClientSession) -> None:
    async with http.get(hub.url + "/v1/stream", headers=auth()) as r:
        assert r.status == 200
        assert r.content_type == "application/x-ndjson"
        msg = await first_line(r)
    assert msg["type"] == "snapshot" and msg["seq"] >= 1
    assert msg["fleet"]["nodes"] == 0 and msg["rollouts"] == []
    assert len(msg["fleet"]["digest"]) == 24


async def test_stream_cap_refuses_one_more_and_frees_a_slot_on_close(
        hub: InProcessHub, http: aiohttp.ClientSession) -> None:
    watcher = hub.app[stream.WATCHER_KEY]
    watcher.max_streams = 2
    a = await http.get(hub.url + "/v1/stream", headers=auth())
    b = await http.get(hub.url + "/v1/stream", headers=auth())
    assert (a.status, b.status) == (200, 200)
    await first_line(a)
    async with http.get(hub.url + "/v1/stream", headers=auth()) as r:
        assert r.status == 503
        assert r.headers["Retry-After"] == "5"
        assert (await r.json())["error"]["code"] == "too_many_streams"
    assert watcher.refused == 1
    a.close()  # the client goes away: its slot is given back
    await until(lambda: watcher.readers == 1, 20, "the closed stream's slot freed")
    async with http.get(hub.url + "/v1/stream", headers=auth()) as r:
        assert r.status == 200
        await first_line(r)
    b.close()


async def test_shutdown_ends_open_streams_with_bye_promptly(
        tmp_path: Path, http: aiohttp.ClientSession) -> None:
    async with running_hub(hub_settings(tmp_path / "data")) as h:
        resp = await http.get(h.url + "/v1/stream", headers=auth())
        await first_line(resp)
        t0 = time.monotonic()
    # leaving the context shut the app down: the stream said goodbye, nothing waited 20 s
    assert time.monotonic() - t0 < 5
    rest = await asyncio.wait_for(resp.content.read(), 5)
    lines = [orjson.loads(x) for x in rest.splitlines() if x.strip()]
    assert lines[-1] == {"type": "bye", "reason": "shutdown"}
    resp.close()


async def test_static_files_carry_csp_and_etag(
        hub: InProcessHub, http: aiohttp.ClientSession) -> None:
    async with http.get(hub.url + "/") as r:
        assert r.status == 200 and r.content_type == "text/html"
        assert "/ui/app.js" in await r.text()
        csp = r.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp
        assert "unsafe-inline" not in csp
    async with http.get(hub.url + "/ui/app.js") as r:
        assert r.status == 200 and r.content_type == "text/javascript"
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        etag = r.headers["ETag"]
    async with http.get(hub.url + "/ui/app.js", headers={"If-None-Match": etag}) as r:
        assert r.status == 304
    for path in ("/ui/nope.js", "/ui/index.html", "/ui/..%2Fpages.py", "/ui/__init__.py"):
        async with http.get(hub.url + path) as r:
            assert r.status == 404, path
            assert (await r.json())["error"]["code"] == "not_found"
