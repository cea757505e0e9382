"""The hub's composition root: ``build_app`` wires the HTTP API, ``serve`` runs it.

Every part is built here and handed what it needs through its constructor: the registry (with
the ``is_assigned`` check it asks before a delete, answered by the control plane), the control
plane (reading versions from the registry), the REST APIs (the registry, and the control plane
behind ``hub.api.ports.FleetControl``) and ``/metrics``. Their lifetime is one
``AsyncExitStack`` on the app: opened in dependency order before the first request, closed in
reverse after the last. ``serve`` owns the process lifetime: SIGTERM/SIGINT only set an event;
shutdown then closes listeners and waits a bounded time for requests in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Callable
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry

from hub.api import fleet as api_fleet
from hub.api import openapi
from hub.api import registry as api_registry
from hub.api.httputil import SETTINGS_KEY, TOKEN_KEY, error_middleware
from hub.config import ConfigError, HubSettings
from hub.registry.service import AssignedCheck, Registry
from hub.server import metrics as server_metrics
from hub.server.control import ControlPlane

log = structlog.get_logger(__name__)

OPENAPI_KEY = web.AppKey("hub_openapi", dict[str, Any])
#: Largest request body outside uploads (JSON bodies of other APIs), bytes.
MAX_JSON_BODY_BYTES = 1024 * 1024
#: Seconds requests in flight get to finish on shutdown (below the pod's 30 s grace period).
SHUTDOWN_TIMEOUT_S = 20.0


async def _openapi(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI_KEY])


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def build_app(
    settings: HubSettings,
    *,
    registry: Registry | None = None,
    is_assigned: AssignedCheck | None = None,
) -> web.Application:
    """The hub's aiohttp application.

    ``registry`` defaults to one on ``storage.data_dir`` that asks the control plane whether a
    version is in use before deleting it; ``is_assigned`` replaces that answer (tests). A
    registry handed in keeps the check it was built with; the app opens and closes it.
    """
    try:
        token = settings.api_token()
    except OSError as exc:
        raise ConfigError([("api.token_file", f"cannot read: {exc.strerror}",
                            str(settings.api.token_file))]) from exc
    app = web.Application(middlewares=[error_middleware], client_max_size=MAX_JSON_BODY_BYTES)
    app[SETTINGS_KEY] = settings
    if token:
        app[TOKEN_KEY] = token
    else:
        log.warning("api_token_missing", effect="every mutating request is refused")
    app[OPENAPI_KEY] = openapi.build_document()

    # the registry asks the control plane, which reads versions from the registry: the one
    # cycle of the hub, closed here by a call that looks the control plane up when it is made
    def assigned(name: str, version: str) -> list[str]:
        return control.is_assigned(name, version)

    reg = registry or Registry(settings, is_assigned=is_assigned or assigned)
    control = ControlPlane(settings, reg)
    metrics_registry = CollectorRegistry(auto_describe=False)
    metrics_registry.register(server_metrics.FleetCollector(control))
    api_registry.setup(app, reg)
    api_fleet.setup(app, control, metrics_registry=metrics_registry,
                    openapi_doc=app[OPENAPI_KEY])
    app.router.add_get(openapi.OPENAPI_PATH, _openapi)
    app.router.add_get("/healthz", _health)

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            await reg.open()
            stack.push_async_callback(reg.aclose)
            await stack.enter_async_context(control)
            yield

    app.cleanup_ctx.append(lifetime)
    return app


def _remove_signal_handler(loop: asyncio.AbstractEventLoop, sig: signal.Signals) -> None:
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.remove_signal_handler(sig)


async def serve(
    settings: HubSettings,
    *,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[list[str]], None] | None = None,
) -> None:
    """Run the hub until ``stop`` is set (or SIGTERM/SIGINT), then shut down gracefully."""
    stop = stop or asyncio.Event()
    app = build_app(settings)
    runner = web.AppRunner(app, handle_signals=False, access_log=None,
                           shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    loop = asyncio.get_running_loop()
    async with contextlib.AsyncExitStack() as stack:
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        site = web.TCPSite(runner, settings.api.host, settings.api.port)
        await site.start()
        addrs = [f"http://{a[0]}:{a[1]}" for a in runner.addresses if isinstance(a, tuple)]
        log.info("hub_listening", addresses=addrs, public_url=settings.public_url())
        if on_ready is not None:
            on_ready(addrs)
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
            stack.callback(_remove_signal_handler, loop, sig)
        await stop.wait()
        log.info("hub_stopping")
    log.info("hub_stopped")
