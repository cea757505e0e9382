"""What both HTTP servers (the hub's API, the agent's endpoints) need beyond aiohttp's defaults.

aiohttp parses requests well but does not bound how long a client may take to send one: a
connection that sends nothing, a request head at a byte a second, or a body that trickles holds
a socket, a file descriptor and a task forever, and a few hundred of them starve the server.
So each server listens through a ``GuardedSite``, whose connections are ``GuardedHandler``
protocols (aiohttp's own request handler plus deadlines):

- **idle**: a connection that sends nothing for ``idle_timeout_s`` after it was accepted or
  after its previous response is closed; so is one that reads none of our response for as long
  (its socket buffer stays full);
- **header**: from the first byte of a request to the end of its head, ``header_timeout_s``
  (and the TLS handshake gets as long);
- **body**: a request body must arrive within ``body_timeout_s`` plus one second per
  ``body_min_bytes_per_s`` bytes received (a slow but honest upload of a large model keeps
  going; a byte a second is cut off, as Apache's ``mod_reqtimeout`` does);
- **cap**: at most ``max_connections`` open at once; one more is answered 503 and closed.

The phase a connection is in is known from the bytes it sends and from ``guard_middleware``,
which every app installs first (``harden``): it marks when a request reached the application
and when its response was handed back. Errors that aiohttp answers itself (a request line or
header it cannot parse) get the same JSON body as every other error, and the ``Server`` header
names the program, never versions. Every closed connection is counted by reason and logged.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import ssl
from collections.abc import Awaitable, Callable, Iterator
from http import HTTPStatus
from typing import Any, Literal

import orjson
import structlog
from aiohttp import hdrs, web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import Field

from edge_agent.common import settings as common_settings

log = structlog.get_logger(__name__)

CloseReason = Literal["idle_timeout", "header_timeout", "body_timeout", "send_timeout",
                      "over_capacity"]
#: Longest request line and header field, bytes (aiohttp's default; 431/400 beyond).
MAX_LINE_BYTES = 8190
#: Most header fields in one request (aiohttp allows 128; no client of ours sends 20).
MAX_HEADERS = 64


class ServerLimits(common_settings.Section):
    """Timeouts and the connection cap of an HTTP server (both programs' servers have them)."""

    #: Seconds a connection may stay silent: after it is accepted or after a response, before
    #: the next request starts; also how long a client may leave our response unread. Default
    #: 30 s: a CLI or an agent reuses its connection within a command, a probe reconnects.
    idle_timeout_s: float = Field(30.0, gt=0, le=3600)
    #: Seconds from the first byte of a request to the end of its head (and for the TLS
    #: handshake). Default 10 s: a head is at most a few KB, even a poor link sends it in one.
    header_timeout_s: float = Field(10.0, gt=0, le=600)
    #: Seconds a request body may take before ``body_min_bytes_per_s`` extends it. Default
    #: 30 s.
    body_timeout_s: float = Field(30.0, gt=0, le=3600)
    #: Each body byte received extends the body's deadline by 1/this seconds, so an upload at
    #: this rate or faster never times out and a slower one ends after ``body_timeout_s``
    #: and a bit. Default 16384 B/s (128 kbit/s): below any working site link.
    body_min_bytes_per_s: int = Field(16384, ge=1)
    #: Connections open at once; one more is answered 503 and closed. Default 256.
    max_connections: int = Field(256, ge=1, le=65535)


class ConnectionStats:
    """Connections open now and closed by this module, by reason (one writer: the loop)."""

    def __init__(self) -> None:
        self.open = 0
        self.closed: collections.Counter[str] = collections.Counter()


class StatsCollector(Collector):
    """``{prefix}_http_connections_open`` and ``{prefix}_http_connections_closed_total``."""

    def __init__(self, stats: ConnectionStats, prefix: str) -> None:
        self.stats = stats
        self.prefix = prefix

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(f"{self.prefix}_http_connections_open",
                                "HTTP connections open now", value=self.stats.open)
        closed = CounterMetricFamily(
            f"{self.prefix}_http_connections_closed",
            "HTTP connections closed by a timeout or refused by the connection cap",
            labels=["reason"])
        for reason in ("idle_timeout", "header_timeout", "body_timeout", "send_timeout",
                       "over_capacity"):
            closed.add_metric([reason], self.stats.closed[reason])
        yield closed


def json_error_bytes(status: int, code: str, message: str) -> bytes:
    """The one error body shape of both programs, serialised."""
    return orjson.dumps({"error": {"code": code, "message": message}})


class Gate:
    """What the connections of one server share: limits, the tally, names for errors."""

    def __init__(self, limits: ServerLimits, server_name: str, *,
                 error_codes: dict[int, str] | None = None) -> None:
        self.limits = limits
        self.server_name = server_name
        self.error_codes = {400: "bad_request", 413: "too_large", 431: "headers_too_large",
                            500: "internal", **(error_codes or {})}
        self.stats = ConnectionStats()

    def error_code(self, status: int) -> str:
        """The JSON error code of an HTTP status."""
        return self.error_codes.get(status, "http_error")

    def closed(self, reason: CloseReason, peer: Any) -> None:
        """Count and log one connection this module closed."""
        self.stats.closed[reason] += 1
        log.info("http_connection_closed", server=self.server_name, reason=reason,
                 peer=str(peer), total=self.stats.closed[reason])


class GuardedHandler(web.RequestHandler):
    """aiohttp's request handler with the deadlines of the module docstring.

    One timer at a time runs the phase the connection is in: ``idle`` (nothing received since
    the connection opened or the last response), ``header`` (a request head is arriving),
    ``body`` (the application waits for a body). While the application handles a request
    and no body is due, no timer runs: a long download is not a slow client.
    """

    def __init__(self, manager: web.Server, gate: Gate, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.gate = gate
        self._phase: Literal["idle", "header", "request", "refused"] = "idle"
        self._timer: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None
        self._body: web.Request | None = None
        self._body_start = 0.0
        self._body_bytes = 0
        self._counted = False

    # ------------------------------------------------------------------ protocol events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stats = self.gate.stats
        if stats.open >= self.gate.limits.max_connections:
            self._phase = "refused"
            self._refuse(transport)
            return
        stats.open += 1
        self._counted = True
        super().connection_made(transport)
        self._arm(self.gate.limits.idle_timeout_s, "idle_timeout")

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        self._body = None
        if self._counted:
            self._counted = False
            self.gate.stats.open -= 1
        if self._phase != "refused":
            super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._phase == "refused":
            return
        if self._phase == "idle":
            self._phase = "header"
            self._arm(self.gate.limits.header_timeout_s, "header_timeout")
        elif self._body is not None:
            self._body_bytes += len(data)
        super().data_received(data)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None and self._phase != "refused":
            loop = asyncio.get_running_loop()
            self._send_timer = loop.call_later(self.gate.limits.idle_timeout_s, self._expire,
                                               "send_timeout")

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    # -------------------------------------------------------------- application events

    def request_started(self, request: web.Request) -> None:
        """A request reached the application: the head is complete; a body may be due."""
        self._cancel()
        self._phase = "request"
        self._body = None
        if request.body_exists and not request.content.is_eof():
            self._body = request
            self._body_start = asyncio.get_running_loop().time()
            self._body_bytes = 0
            self._arm(self.gate.limits.body_timeout_s, "body_timeout")

    def request_finished(self) -> None:
        """The application handed back its response: the connection idles until the next."""
        self._body = None
        if self._phase == "request" and self.transport is not None:
            self._phase = "idle"
            self._arm(self.gate.limits.idle_timeout_s, "idle_timeout")

    # ------------------------------------------------------------------------- timers

    def _arm(self, seconds: float, reason: CloseReason) -> None:
        self._cancel()
        self._timer = asyncio.get_running_loop().call_later(seconds, self._expire, reason)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self, reason: CloseReason) -> None:
        if reason == "send_timeout":
            self._send_timer = None
        else:
            self._timer = None
        if reason == "body_timeout" and self._body is not None:
            if self._body.content.is_eof():
                self._body = None  # all there: the application is just slow to read it
                return
            limits = self.gate.limits
            loop = asyncio.get_running_loop()
            deadline = (self._body_start + limits.body_timeout_s
                        + self._body_bytes / limits.body_min_bytes_per_s)
            if loop.time() < deadline:
                self._timer = loop.call_at(deadline, self._expire, reason)
                return
        transport = self.transport
        if transport is None:
            return
        self.gate.closed(reason, transport.get_extra_info("peername"))
        self.force_close()
        transport.abort()

    def _refuse(self, transport: asyncio.BaseTransport) -> None:
        body = json_error_bytes(503, "too_many_connections",
                                "the server has too many open connections; retry later")
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n"
                f"Server: {self.gate.server_name}\r\n\r\n").encode("ascii")
        self.gate.closed("over_capacity", transport.get_extra_info("peername"))
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(head + body)
        transport.close()

    # ------------------------------------------------------------- aiohttp's own errors

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """A request aiohttp could not parse (or a crash outside the app): a JSON body, the
        connection closed, no text of the request echoed back."""
        if isinstance(exc, ConnectionError):  # the client went, or a deadline cut it off
            log.info("http_client_gone", server=self.gate.server_name, error=type(exc).__name__)
        elif status >= 500:
            log.error("http_internal_error", server=self.gate.server_name,
                      error=type(exc).__name__ if exc else None)
        else:
            log.info("http_unparsable_request", server=self.gate.server_name, status=status,
                     error=type(exc).__name__ if exc else None)
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Error"
        text = ("the request could not be parsed" if status < 500
                else "internal error; see the server's log")
        resp = web.Response(
            status=status,
            body=json_error_bytes(status, self.gate.error_code(status), f"{phrase}: {text}"),
            content_type="application/json",
            headers={hdrs.SERVER: self.gate.server_name},
        )
        resp.force_close()
        return resp


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def guard_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Tell the connection's guard when a request reaches the application and leaves it."""
    guard = request.protocol if isinstance(request.protocol, GuardedHandler) else None
    if guard is not None:
        guard.request_started(request)
    try:
        return await handler(request)
    finally:
        if guard is not None:
            guard.request_finished()


def harden(app: web.Application, server_name: str) -> None:
    """Install ``guard_middleware`` first and a ``Server`` header without versions."""
    app.middlewares.insert(0, guard_middleware)

    async def server_header(request: web.Request, response: web.StreamResponse) -> None:
        response.headers[hdrs.SERVER] = server_name

    app.on_response_prepare.append(server_header)


class GuardedSite(web.BaseSite):
    """A TCP site (optionally TLS) whose connections are ``GuardedHandler``\\ s of ``gate``."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, gate: Gate,
                 ssl_context: ssl.SSLContext | None = None, backlog: int = 128) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self.host = host
        self.port = port
        self.gate = gate

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self.host}:{self.port}"

    async def start(self) -> None:
        """Listen; ``port`` is the bound port afterwards (useful with port 0)."""
        await super().start()
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        limits = self.gate.limits
        # aiohttp's own keep-alive close (a head still incomplete, so long after the connection
        # or the last response) is only a backstop, well behind the guard's deadlines
        kwargs: dict[str, Any] = {
            "loop": loop, "access_log": None, "max_line_size": MAX_LINE_BYTES,
            "max_field_size": MAX_LINE_BYTES, "max_headers": MAX_HEADERS,
            "keepalive_timeout": 2 * (limits.idle_timeout_s + limits.header_timeout_s),
        }
        self._server = await loop.create_server(
            lambda: GuardedHandler(server, self.gate, **kwargs), self.host, self.port,
            ssl=self._ssl_context, backlog=self._backlog,
            ssl_handshake_timeout=limits.header_timeout_s if self._ssl_context else None,
        )
        sockets = self._server.sockets
        if sockets:
            self.port = int(sockets[0].getsockname()[1])


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (a listen address or a URL's host) reaches this machine only."""
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
