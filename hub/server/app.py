"""The hub's composition root: ``build_app`` wires the HTTP API, ``serve`` runs it.

Every part is built here and handed what it needs through its constructor: the registry (with
the ``is_assigned`` check it asks before a delete, answered by the control plane), the control
plane (reading versions from the registry), the REST APIs (the registry, and the control plane
behind ``hub.api.ports.FleetControl``), ``/metrics`` and the fleet page (``hub.web``). Their
lifetime is one ``AsyncExitStack`` on the app: opened in dependency order before the first
request, closed in reverse after the last. ``serve`` owns the process lifetime: SIGTERM/SIGINT
only set an event; shutdown then closes listeners and waits a bounded time for requests in
flight.

The hub listens with TLS unless ``api.plain_http`` (``ssl_context``), asks for client
certificates when ``api.client_ca_file`` is set, and every connection runs under the limits of
``edge_agent.common.httpserver`` (header, body and idle timeouts, a connection cap; ``listen``).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry

from edge_agent.common import httpserver
from edge_agent.common import settings as common_settings
from hub.api import fleet as api_fleet
from hub.api import httputil, openapi
from hub.api import pki as api_pki
from hub.api import registry as api_registry
from hub.api.httputil import SETTINGS_KEY, TOKENS_KEY, error_middleware
from hub.config import ConfigError, HubSettings
from hub.pki import bootstrap as pki_bootstrap
from hub.registry.service import AssignedCheck, Registry
from hub.server import metrics as server_metrics
from hub.server.control import ControlPlane
from hub.web import pages as web_pages

log = structlog.get_logger(__name__)

OPENAPI_KEY = web.AppKey("hub_openapi", dict[str, Any])
#: The connection guard every listener of this app shares (its counts are on ``/metrics``).
GATE_KEY = web.AppKey("hub_http_gate", httpserver.Gate)
#: The ``Server`` header: the program, never its version.
SERVER_NAME = "edge-hub"
#: Largest request body outside uploads (JSON bodies of other APIs), bytes.
MAX_JSON_BODY_BYTES = 1024 * 1024
#: Seconds requests in flight get to finish on shutdown (below the pod's 30 s grace period).
SHUTDOWN_TIMEOUT_S = 20.0


async def _openapi(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI_KEY])


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


CONTROL_KEY = web.AppKey("hub_control", ControlPlane)


async def _ready(request: web.Request) -> web.Response:
    """Readiness: 200 while the database answers (the leader and followers alike), else 503."""
    body = await request.app[CONTROL_KEY].readiness()
    return web.json_response(body, status=200 if body["status"] == "ready" else 503)


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
    tokens = tuple(httputil.ApiToken(secret.encode("utf-8"), scope, name)
                   for secret, scope, name in settings.api_tokens())
    app = web.Application(middlewares=[error_middleware], client_max_size=MAX_JSON_BODY_BYTES)
    httpserver.harden(app, SERVER_NAME)
    app[SETTINGS_KEY] = settings
    app[TOKENS_KEY] = tokens
    app[GATE_KEY] = httpserver.Gate(settings.api, SERVER_NAME,
                                    error_codes=httputil.STATUS_CODES)
    if not any(t.scope == "admin" for t in tokens):
        log.warning("api_admin_token_missing", effect="every push, delete and rollout is refused")
    app[OPENAPI_KEY] = openapi.build_document()

    # the registry asks the control plane, which reads versions from the registry: the one
    # cycle of the hub, closed here by a call that looks the control plane up when it is made
    def assigned(name: str, version: str) -> list[str]:
        return control.is_assigned(name, version)

    reg = registry or Registry(settings, is_assigned=is_assigned or assigned)
    control = ControlPlane(settings, reg)
    app[CONTROL_KEY] = control
    metrics_registry = CollectorRegistry(auto_describe=False)
    metrics_registry.register(server_metrics.FleetCollector(control))
    metrics_registry.register(httpserver.StatsCollector(app[GATE_KEY].stats, "edge_hub"))
    api_registry.setup(app, reg)
    api_fleet.setup(app, control, metrics_registry=metrics_registry,
                    openapi_doc=app[OPENAPI_KEY])
    api_pki.setup(app, pki_bootstrap.Bootstrapper.from_settings(settings, control.cluster),
                  metrics_registry=metrics_registry, openapi_doc=app[OPENAPI_KEY])
    web_pages.setup(app, control, openapi_doc=app[OPENAPI_KEY])
    app.router.add_get(openapi.OPENAPI_PATH, _openapi)
    app.router.add_get("/healthz", _health)
    app.router.add_get("/readyz", _ready)

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            await reg.open()
            stack.push_async_callback(reg.aclose)
            await stack.enter_async_context(control)
            yield

    app.cleanup_ctx.append(lifetime)
    return app


def ssl_context(settings: HubSettings) -> ssl.SSLContext | None:
    """The server's TLS context (None with ``api.plain_http``); ConfigError naming the field
    when a file is missing, unreadable, exposed to other users (the key) or not PEM.

    TLS 1.2 at least. With ``api.client_ca_file`` the hub asks for a client certificate
    without requiring one (humans and CI come with tokens); a certificate that is offered must
    verify against that CA, or the handshake fails. Blocking (reads files).
    """
    api = settings.api
    if api.plain_http:
        return None
    if api.tls_cert_file is None or api.tls_key_file is None:
        missing = "api.tls_cert_file" if api.tls_cert_file is None else "api.tls_key_file"
        raise ConfigError([(missing, "required: the hub serves HTTPS unless api.plain_http "
                            "is true (edge-hub pki issue NAME --role server)", None)])
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    field, path = "api.tls_key_file", api.tls_key_file
    try:
        common_settings.check_secret_file(api.tls_key_file, settings.secret_files)
        field, path = "api.tls_cert_file", api.tls_cert_file
        ctx.load_cert_chain(api.tls_cert_file, api.tls_key_file)
        if api.client_ca_file is not None:
            field, path = "api.client_ca_file", api.client_ca_file
            ctx.load_verify_locations(cafile=api.client_ca_file)
            ctx.verify_mode = ssl.CERT_OPTIONAL
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError([(field, f"cannot be used: {reason}", str(path))]) from exc
    return ctx


async def listen(runner: web.AppRunner, host: str, port: int,
                 tls: ssl.SSLContext | None) -> httpserver.GuardedSite:
    """Start a guarded listener for ``runner``'s app (set up) on host:port; the site, whose
    ``port`` is the bound one."""
    site = httpserver.GuardedSite(runner, host, port, gate=runner.app[GATE_KEY],
                                  ssl_context=tls)
    await site.start()
    return site


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
    tls = ssl_context(settings)
    app = build_app(settings)
    runner = web.AppRunner(app, handle_signals=False, access_log=None,
                           shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    loop = asyncio.get_running_loop()
    async with contextlib.AsyncExitStack() as stack:
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        site = await listen(runner, settings.api.host, settings.api.port, tls)
        addrs = [site.name]
        api = settings.api
        log.info("hub_listening", addresses=addrs, public_url=settings.public_url(),
                 tls=tls is not None, client_certificates=api.client_ca_file is not None,
                 idle_timeout_s=api.idle_timeout_s, header_timeout_s=api.header_timeout_s,
                 body_timeout_s=api.body_timeout_s, max_connections=api.max_connections)
        if on_ready is not None:
            on_ready(addrs)
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
            stack.callback(_remove_signal_handler, loop, sig)
        await stop.wait()
        log.info("hub_stopping")
    log.info("hub_stopped")
