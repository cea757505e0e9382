"""A tiny real HTTP file server for model-sync tests, with faults on demand.

It serves ``/files/{name}`` from a dict of bytes, honours ``Range`` (206 + Content-Range), records
every request's headers, and can fail the next N requests with 503 or cut a response after some
bytes (the connection is aborted mid-body, as a dropped uplink would do). ``error_body``
replaces the body of every error answer (what a hostile or broken server might say), and
``redirect_to`` answers every request with a 302 there.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aiohttp import web

from tests.support.broker import free_port


@dataclass
class FileServer:
    files: dict[str, bytes] = field(default_factory=dict)
    fail_next: int = 0
    cut_after: int | None = None
    cut_times: int = 0
    token: str | None = None
    error_body: bytes | None = None
    redirect_to: str | None = None
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    port: int = 0
    _runner: web.AppRunner | None = None

    @property
    def base(self) -> str:
        """The server's origin, as an agent's ``hub.url``."""
        return f"http://127.0.0.1:{self.port}"

    def url(self, name: str) -> str:
        return f"{self.base}/files/{name}"

    def _error(self, status: int, code: str, message: str) -> web.Response:
        if self.error_body is not None:
            return web.Response(status=status, body=self.error_body, content_type="text/plain")
        return web.json_response({"error": {"code": code, "message": message}}, status=status)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        self.requests.append((name, dict(request.headers)))
        if self.redirect_to is not None:
            raise web.HTTPFound(self.redirect_to)
        auth = request.headers.get("Authorization")
        if self.token is not None and auth != f"Bearer {self.token}":
            return self._error(401, "unauthorized", "no")
        if self.fail_next > 0:
            self.fail_next -= 1
            return self._error(503, "busy", "try later")
        body = self.files.get(name)
        if body is None:
            return self._error(404, "not_found", name)
        start, status = 0, 200
        rng = request.headers.get("Range")
        resp_headers = {"ETag": '"x"', "Accept-Ranges": "bytes"}
        if rng and rng.startswith("bytes="):
            start = int(rng[6:].split("-", 1)[0])
            if start >= len(body):
                return web.Response(status=416)
            status = 206
            resp_headers["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
        payload = body[start:]
        resp = web.StreamResponse(status=status, headers=resp_headers)
        resp.content_length = len(payload)
        await resp.prepare(request)
        if self.cut_times > 0 and self.cut_after is not None and len(payload) > self.cut_after:
            self.cut_times -= 1
            await resp.write(payload[: self.cut_after])
            await resp.drain()
            assert request.transport is not None
            request.transport.abort()
            return resp
        await resp.write(payload)
        await resp.write_eof()
        return resp

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/files/{name}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self.port = free_port()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@contextlib.asynccontextmanager
async def running() -> AsyncIterator[FileServer]:
    """A started ``FileServer`` on a free loopback port, stopped afterwards."""
    s = FileServer()
    await s.start()
    try:
        yield s
    finally:
        await s.stop()
