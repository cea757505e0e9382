"""The agent's HTTP endpoints (aiohttp): probes, metrics, state, and one-shot inference.

``/healthz`` is liveness (the loop runs, no inference is wedged, every root task is alive):
Kubernetes restarts the pod when it fails. ``/readyz`` is readiness (a model is loaded and
warmed, and at least one camera delivers). ``/metrics`` is the Prometheus exposition,
rendered in a thread so a large registry never stalls the loop. ``/v1/models`` and
``/v1/cameras`` show what the agent serves and sees (camera URLs without credentials).

``POST /v1/infer`` takes one image (the raw body, or a multipart form with one file) and
returns the result. It is the one endpoint that costs memory and CPU, so in this order: it
needs the bearer token of ``http.token_file`` (without one it is open on a loopback address
only, off elsewhere); it takes one of ``max_infers`` slots (429 when none is free) before it
reads anything; it reads at most ``max_upload_bytes``; it reads the image's header and refuses
more than ``max_image_pixels`` (``app.images``) before anything is decoded; decoding and
inference then run in the agent's one infer thread. Every error is a 4xx/5xx JSON body
``{"error": {"code": ..., "message": ...}}``, never an HTML page, aiohttp's own included, and
the server runs under the header, body and idle timeouts and the connection cap of
``edge_agent.common.httpserver``.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import orjson
import structlog
from aiohttp import BodyPartReader, hdrs, web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from edge_agent.app import images
from edge_agent.common import httpserver
from edge_agent.common import settings as common_settings
from edge_agent.config import ConfigError, HttpSettings
from edge_agent.errors import AgentError, InputError, ModelError

log = structlog.get_logger(__name__)


class AgentView(Protocol):
    """What the HTTP layer needs from the agent (``edge_agent.app.compose.Agent``)."""

    @property
    def registry(self) -> CollectorRegistry:
        """The Prometheus registry."""
        ...

    def health(self) -> tuple[bool, list[str]]:
        """(alive, reasons it is not)."""
        ...

    def readiness(self) -> tuple[bool, list[str]]:
        """(ready, reasons it is not)."""
        ...

    def models_info(self) -> list[dict[str, Any]]:
        """Each model's name, version, status, providers..."""
        ...

    def cameras_info(self) -> list[dict[str, Any]]:
        """Each camera's state and counters."""
        ...

    async def infer_upload(self, data: bytes, model: str | None,
                           max_pixels: int) -> dict[str, Any]:
        """One result for an encoded image whose header ``images.check`` passed: decoded and
        inferred in the infer thread (raises LookupError, InputError, ModelError)."""
        ...


#: The ``Server`` header: the program, never its version.
SERVER_NAME = "edge-agent"


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def error_response(status: int, code: str, message: str) -> web.Response:
    """The JSON error body every endpoint uses."""
    return _json({"error": {"code": code, "message": message}}, status)


_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                 405: "method_not_allowed", 413: "too_large", 415: "unsupported_media_type",
                 431: "headers_too_large"}


@web.middleware
async def _json_errors(request: web.Request,
                       handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                       ) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _STATUS_CODES.get(exc.status, "http_error")
        return error_response(exc.status, code, exc.reason)
    except ConnectionResetError:
        raise  # the client went away (or was cut off by a timeout): nobody to answer
    except Exception as exc:  # a bug: the client gets JSON, the log gets the traceback
        log.exception("http_handler_failed", path=request.path)
        return error_response(500, "internal", f"internal error: {type(exc).__name__}")


class Endpoints:
    """Request handlers bound to one agent."""

    def __init__(self, agent: AgentView, *, max_upload_bytes: int, max_image_pixels: int,
                 max_infers: int, token: str | None, infer_off: str | None) -> None:
        self.agent = agent
        self.max_upload_bytes = max_upload_bytes
        self.max_image_pixels = max_image_pixels
        self.max_infers = max_infers
        self._token = token.encode("utf-8") if token else None
        #: Why ``POST /v1/infer`` is off (None: it is on).
        self.infer_off = infer_off
        #: Uploads holding a slot now (read, checked, waiting for or in the infer thread).
        self.infers = 0

    async def healthz(self, request: web.Request) -> web.Response:
        ok, reasons = self.agent.health()
        return _json({"status": "ok" if ok else "unhealthy", "reasons": reasons},
                     200 if ok else 503)

    async def readyz(self, request: web.Request) -> web.Response:
        ok, reasons = self.agent.readiness()
        return _json({"status": "ready" if ok else "not_ready", "reasons": reasons},
                     200 if ok else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        body = await asyncio.to_thread(generate_latest, self.agent.registry)
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    async def models(self, request: web.Request) -> web.Response:
        return _json({"models": self.agent.models_info()})

    async def cameras(self, request: web.Request) -> web.Response:
        return _json({"cameras": self.agent.cameras_info()})

    def _refusal(self, request: web.Request) -> web.Response | None:
        """The answer to an upload refused before anything is read (None: go on)."""
        if self.infer_off is not None:
            return error_response(403, "infer_off", self.infer_off)
        if self._token is not None:
            scheme, _, value = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
            given = value.strip().encode("utf-8", "surrogateescape")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given, self._token):
                resp = error_response(401, "unauthorized",
                                      "POST /v1/infer needs the bearer token of http.token_file")
                resp.headers["WWW-Authenticate"] = 'Bearer realm="edge-agent"'
                return resp
        limit = self.max_upload_bytes
        if request.content_length is not None and request.content_length > limit:
            return error_response(413, "too_large",
                                  f"body of {request.content_length} bytes exceeds {limit}")
        ctype = request.content_type
        if not (ctype.startswith(("multipart/", "image/"))
                or ctype in ("application/octet-stream", "")):
            return error_response(415, "unsupported_media_type",
                                  f"send an image (image/* or application/octet-stream "
                                  f"body, or multipart/form-data), not {ctype}")
        if self.infers >= self.max_infers:
            return error_response(429, "busy", f"{self.max_infers} uploads are already being "
                                  "inferred; retry")
        return None

    async def infer(self, request: web.Request) -> web.Response:
        refused = self._refusal(request)
        if refused is not None:
            return refused
        self.infers += 1  # the slot is taken before a byte of the body is read
        try:
            return await self._infer(request)
        finally:
            self.infers -= 1

    async def _infer(self, request: web.Request) -> web.Response:  # noqa: PLR0911
        limit = self.max_upload_bytes
        try:
            if request.content_type.startswith("multipart/"):
                data = await self._read_multipart(request, limit)
            else:
                data = await self._read_limited(request, limit)
        except web.HTTPRequestEntityTooLarge:
            return error_response(413, "too_large", f"body exceeds {limit} bytes")
        if not data:
            return error_response(400, "empty_body", "the request has no image")
        try:
            images.check(data, self.max_image_pixels)  # nothing is decoded before this
            result = await self.agent.infer_upload(data, request.query.get("model"),
                                                   self.max_image_pixels)
        except images.UnsupportedImageError as exc:
            return error_response(415, "unsupported_image", str(exc))
        except images.TooManyPixelsError as exc:
            return error_response(413, "too_many_pixels", str(exc))
        except InputError as exc:
            return error_response(400, "invalid_image", str(exc))
        except LookupError as exc:
            return error_response(404, "unknown_model", str(exc.args[0]) if exc.args else "")
        except ModelError as exc:
            return error_response(503, "model_unavailable", str(exc))
        return _json(result)

    @staticmethod
    async def _read_limited(request: web.Request, limit: int) -> bytes:
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > limit:  # chunked uploads carry no Content-Length: count as we go
                raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size)
            chunks.append(chunk)
        return b"".join(chunks)

    @staticmethod
    async def _read_multipart(request: web.Request, limit: int) -> bytes:
        """The first file part (or a part named ``image``/``file``) of a multipart form."""
        reader = await request.multipart()
        async for part in reader:
            if not isinstance(part, BodyPartReader):
                continue  # a nested multipart: not what a client uploading one image sends
            if part.filename is None and part.name not in ("image", "file"):
                continue
            chunks: list[bytes] = []
            size = 0
            while chunk := await part.read_chunk(64 * 1024):
                size += len(chunk)
                if size > limit:
                    raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size)
                chunks.append(chunk)
            return b"".join(chunks)
        return b""


def build_app(agent: AgentView, *, max_upload_bytes: int, max_image_pixels: int,
              max_infers: int, token: str | None = None,
              infer_off: str | None = None) -> web.Application:
    """The aiohttp application serving ``agent`` (see the module docstring for the limits)."""
    # client_max_size bounds what aiohttp itself buffers; our readers enforce the exact limit
    app = web.Application(middlewares=[_json_errors], client_max_size=max_upload_bytes + 65536)
    httpserver.harden(app, SERVER_NAME)
    ep = Endpoints(agent, max_upload_bytes=max_upload_bytes, max_image_pixels=max_image_pixels,
                   max_infers=max_infers, token=token, infer_off=infer_off)
    app.router.add_get("/healthz", ep.healthz)
    app.router.add_get("/readyz", ep.readyz)
    app.router.add_get("/metrics", ep.metrics)
    app.router.add_get("/v1/models", ep.models)
    app.router.add_get("/v1/cameras", ep.cameras)
    app.router.add_post("/v1/infer", ep.infer)
    return app


class HttpServer:
    """Runs ``build_app`` on host:port under ``limits``; ``port=0`` in the config disables it
    (not here: here 0 picks a free port, for tests)."""

    def __init__(self, app: web.Application, host: str, port: int,
                 limits: httpserver.ServerLimits, gate: httpserver.Gate | None = None) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.gate = gate or httpserver.Gate(limits, SERVER_NAME, error_codes=_STATUS_CODES)
        self._runner: web.AppRunner | None = None

    async def start(self) -> int:
        """Listen; return the bound port (useful with port 0 in tests)."""
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        self._runner = runner
        site = httpserver.GuardedSite(runner, self.host, self.port, gate=self.gate)
        try:
            await site.start()
        except OSError as exc:
            raise AgentError(f"cannot listen on {self.host}:{self.port}: "
                             f"{exc.strerror or exc}") from exc
        self.port = site.port
        limits = self.gate.limits
        log.info("http_listening", host=self.host, port=self.port,
                 idle_timeout_s=limits.idle_timeout_s, header_timeout_s=limits.header_timeout_s,
                 body_timeout_s=limits.body_timeout_s, max_connections=limits.max_connections)
        return self.port

    async def aclose(self) -> None:
        """Stop listening and finish open requests (bounded by the runner's timeout)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


async def open_server(agent: AgentView, h: HttpSettings,
                      secret_files: common_settings.SecretFilePolicy,
                      max_infers: int) -> HttpServer:
    """The agent's HTTP server as ``h`` configures it, not yet listening: the token of
    ``h.token_file`` read (ConfigError naming the field), ``POST /v1/infer`` off when neither
    a token nor a loopback address protects it, or ``h.infer`` is false."""
    token = None
    if h.token_file is not None:
        try:
            token = await asyncio.to_thread(common_settings.read_secret, h.token_file,
                                            secret_files)
        except OSError as exc:
            raise ConfigError([("http.token_file", f"cannot read: {exc.strerror or exc}",
                                str(h.token_file))]) from exc
        if not token.strip():
            raise ConfigError([("http.token_file", "the file holds no token",
                                str(h.token_file))])
    off = None
    if not h.infer:
        off = "POST /v1/infer is off (http.infer: false)"
    elif token is None and not httpserver.is_loopback(h.host):
        off = (f"POST /v1/infer is off: the agent listens on {h.host}, beyond loopback, "
               "and http.token_file is not set")
    if off is not None:
        log.info("http_infer_off", reason=off)
    app = build_app(agent, max_upload_bytes=h.max_upload_bytes,
                    max_image_pixels=h.max_image_pixels, max_infers=max_infers, token=token,
                    infer_off=off)
    return HttpServer(app, h.host, h.port, h)
