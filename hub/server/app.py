"""The hub's composition root: ``build_app`` wires the HTTP API, ``serve`` runs it.

Components (the registry, the "is this version assigned" callable, the rollout side) are built
here or passed in, so tests can hand in their own and other API modules hook in with one line
each. ``serve`` owns the process lifetime: SIGTERM/SIGINT only set an event; shutdown then
closes listeners and waits a bounded time for requests in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Callable
from typing import Any

import structlog
from aiohttp import web

from hub.api import fleet as api_fleet
from hub.api import registry as api
from hub.api.httputil import SETTINGS_KEY, TOKEN_KEY, error_middleware
from hub.api.openapi import OPENAPI_PATH, build_document
from hub.config import ConfigError, HubSettings
from hub.registry.service import AssignedCheck, Registry

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
    **components: Any,
) -> web.Application:
    """The hub's aiohttp application.

    ``registry`` defaults to one on ``storage.data_dir``; ``is_assigned`` (rollouts) tells it
    whether a version may be deleted. Other ``components`` are for the APIs that hook in here.
    """
    control = components.pop("control", None)  # a ControlPlane for api_fleet (tests)
    if components:
        raise TypeError(f"unknown components: {sorted(components)}")
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
    app[OPENAPI_KEY] = build_document()
    reg = registry or Registry(settings, is_assigned=is_assigned)
    api.setup(app, reg)
    # hook: the rollout/fleet API adds its routes and paths here (hub/api/fleet.py, issue 7)
    api_fleet.setup(app, reg, control=control, openapi=app[OPENAPI_KEY],
                    set_is_assigned=registry is None and is_assigned is None)
    app.router.add_get(OPENAPI_PATH, _openapi)
    app.router.add_get("/healthz", _health)

    async def registry_ctx(app: web.Application) -> AsyncIterator[None]:
        await reg.open()
        yield
        await reg.aclose()

    app.cleanup_ctx.append(registry_ctx)
    return app


async def serve(
    settings: HubSettings,
    *,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[list[str]], None] | None = None,
    **components: Any,
) -> None:
    """Run the hub until ``stop`` is set (or SIGTERM/SIGINT), then shut down gracefully."""
    stop = stop or asyncio.Event()
    app = build_app(settings, **components)
    runner = web.AppRunner(app, handle_signals=False, access_log=None,
                           shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    loop = asyncio.get_running_loop()
    try:
        site = web.TCPSite(runner, settings.api.host, settings.api.port)
        await site.start()
        addrs = [f"http://{a[0]}:{a[1]}" for a in runner.addresses if isinstance(a, tuple)]
        log.info("hub_listening", addresses=addrs, public_url=settings.public_url())
        if on_ready is not None:
            on_ready(addrs)
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("hub_stopping")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
        await runner.cleanup()
    log.info("hub_stopped")
