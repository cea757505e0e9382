"""The agent's HTTP endpoints (aiohttp): probes, metrics, state, and one-shot inference.

``/healthz`` is liveness (the loop runs, no inference is wedged, every root task is alive):
Kubernetes restarts the pod when it fails. ``/readyz`` is readiness (a model is loaded and
warmed, and at least one camera delivers). ``/metrics`` is the Prometheus exposition,
rendered in a thread so a large registry never stalls the loop. ``/v1/models`` and
``/v1/cameras`` show what the agent serves and sees. ``POST /v1/infer`` takes one image
(the raw body, or a multipart form with one file) and returns the result; the body size is
bounded before it is read, and every error is a 4xx/5xx JSON body
``{"error": {"code": ..., "message": ...}}``, never an HTML page.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import numpy as np
import orjson
import structlog
from aiohttp import BodyPartReader, web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

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

    async def infer_image(self, image: np.ndarray, model: str | None) -> dict[str, Any]:
        """One result for a decoded BGR image (raises InputError/ModelError, BusyError)."""
        ...


class BusyError(Exception):
    """Too many uploads are already being inferred (429)."""


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def error_response(status: int, code: str, message: str) -> web.Response:
    """The JSON error body every endpoint uses."""
    return _json({"error": {"code": code, "message": message}}, status)


_STATUS_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed",
                 413: "too_large", 415: "unsupported_media_type"}


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
    except Exception as exc:  # a bug: the client gets JSON, the log gets the traceback
        log.exception("http_handler_failed", path=request.path)
        return error_response(500, "internal", f"internal error: {type(exc).__name__}")


def _decode_image(data: bytes) -> np.ndarray:
    import cv2  # noqa: PLC0415 - heavy, and only this endpoint needs it here

    buf = np.frombuffer(data, dtype=np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if img is None or img.size == 0:
        raise InputError("body is not a decodable image (JPEG, PNG, BMP, WebP, TIFF...)")
    return img


class Endpoints:
    """Request handlers bound to one agent."""

    def __init__(self, agent: AgentView, max_upload_bytes: int) -> None:
        self.agent = agent
        self.max_upload_bytes = max_upload_bytes

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

    async def infer(self, request: web.Request) -> web.Response:  # noqa: PLR0911
        limit = self.max_upload_bytes
        if request.content_length is not None and request.content_length > limit:
            return error_response(413, "too_large",
                                  f"body of {request.content_length} bytes exceeds {limit}")
        ctype = request.content_type
        try:
            if ctype.startswith("multipart/"):
                data = await self._read_multipart(request, limit)
            elif ctype.startswith("image/") or ctype in ("application/octet-stream", ""):
                data = await self._read_limited(request, limit)
            else:
                return error_response(415, "unsupported_media_type",
                                      f"send an image (image/* or application/octet-stream "
                                      f"body, or multipart/form-data), not {ctype}")
        except web.HTTPRequestEntityTooLarge:
            return error_response(413, "too_large", f"body exceeds {limit} bytes")
        if not data:
            return error_response(400, "empty_body", "the request has no image")
        model = request.query.get("model")
        try:
            image = await asyncio.to_thread(_decode_image, data)
            result = await self.agent.infer_image(image, model)
        except InputError as exc:
            return error_response(400, "invalid_image", str(exc))
        except BusyError as exc:
            return error_response(429, "busy", str(exc))
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


def build_app(agent: AgentView, *, max_upload_bytes: int) -> web.Application:
    """The aiohttp application serving ``agent``."""
    # client_max_size bounds what aiohttp itself buffers; our readers enforce the exact limit
    app = web.Application(middlewares=[_json_errors], client_max_size=max_upload_bytes + 65536)
    ep = Endpoints(agent, max_upload_bytes)
    app.router.add_get("/healthz", ep.healthz)
    app.router.add_get("/readyz", ep.readyz)
    app.router.add_get("/metrics", ep.metrics)
    app.router.add_get("/v1/models", ep.models)
    app.router.add_get("/v1/cameras", ep.cameras)
    app.router.add_post("/v1/infer", ep.infer)
    return app


class HttpServer:
    """Runs ``build_app`` on host:port; ``port=0`` in the config disables it (not here)."""

    def __init__(self, app: web.Application, host: str, port: int) -> None:
        self.app = app
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    async def start(self) -> int:
        """Listen; return the bound port (useful with port 0 in tests)."""
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        self._runner = runner
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except OSError as exc:
            raise AgentError(f"cannot listen on {self.host}:{self.port}: "
                             f"{exc.strerror or exc}") from exc
        server = getattr(site, "_server", None)
        if server is not None and server.sockets:
            self.port = server.sockets[0].getsockname()[1]
        log.info("http_listening", host=self.host, port=self.port)
        return self.port

    async def aclose(self) -> None:
        """Stop listening and finish open requests (bounded by the runner's timeout)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
