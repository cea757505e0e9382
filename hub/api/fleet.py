"""The REST API of the rollout side: nodes, rollouts and their commands, ``/metrics``.

Hooked into the hub's app by ``setup(app, control, ...)`` (called from ``hub/server/app.py``),
where ``control`` answers the questions ``hub/api/ports.py`` names. Errors and caller checks
are the registry API's (``hub/api/httputil.py``): every read needs a ``read`` token, every
mutating route an ``admin`` one (an agent's certificate reads none of this), bad input is a
4xx JSON error and changes nothing. The paths are added to the hub's OpenAPI
document (``hub/api/fleet_openapi.py``).

Routes::

    GET  /v1/nodes[?selector=]          the fleet: labels, online, versions, health
    GET  /v1/nodes/{node}
    GET  /v1/rollouts[?limit=]          newest first
    POST /v1/rollouts                   start one (``"dry_run": true`` only plans)
    GET  /v1/rollouts/{id}              state, plan, per-node progress and live metrics, events
    POST /v1/rollouts/{id}/{command}    pause | resume | promote | abort | rollback
    GET  /metrics                       Prometheus exposition (fleet, rollouts, hub counters)
"""

from __future__ import annotations

from typing import Any

import orjson
import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from hub.api import fleet_openapi, openapi, ports
from hub.api.httputil import Caller, authorize
from hub.cluster.selectors import parse_selector
from hub.errors import InvalidRequest, NotFound
from hub.rollouts.controller import VERBS
from hub.rollouts.model import parse_spec

log = structlog.get_logger(__name__)

CONTROL_KEY = web.AppKey("hub_fleet_control", ports.FleetControl)
METRICS_KEY = web.AppKey("hub_fleet_metrics", CollectorRegistry)
_MAX_ACTOR = 64


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _actor(request: web.Request, caller: Caller) -> str:
    """Who asked: the token's holder, with the ``X-Actor`` header (informational, e.g. a CI
    job's name) after it when given; the token is the authority."""
    actor = request.headers.get("X-Actor", "").strip()[:_MAX_ACTOR]
    if actor and actor.isprintable() and actor != caller.name:
        return f"{caller.name} ({actor})"
    return caller.name


def _rollout_id(request: web.Request) -> int:
    raw = request.match_info["id"]
    if not raw.isdigit() or len(raw) > 12:
        raise InvalidRequest(f"rollout id must be a positive integer, got {raw!r}")
    return int(raw)


async def list_nodes(request: web.Request) -> web.Response:
    authorize(request, "read")
    selector = parse_selector(request.query.get("selector", ""))
    control = request.app[CONTROL_KEY]
    nodes = control.nodes(selector)
    return _json({"nodes": nodes, "versions": control.versions(n["name"] for n in nodes)})


async def show_node(request: web.Request) -> web.Response:
    authorize(request, "read")
    name = request.match_info["node"]
    node = request.app[CONTROL_KEY].node(name)
    if node is None:
        raise NotFound(f"node {name!r} is not a camera node of this hub")
    return _json(node)


async def list_rollouts(request: web.Request) -> web.Response:
    authorize(request, "read")
    raw = request.query.get("limit", "50")
    if not raw.isdigit() or not 1 <= int(raw) <= 1000:
        raise InvalidRequest("limit must be an integer in [1, 1000]")
    return _json({"rollouts": await request.app[CONTROL_KEY].rollouts(int(raw))})


async def create_rollout(request: web.Request) -> web.Response:
    caller = authorize(request, "admin")
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise InvalidRequest("body must be a JSON object")
    dry_run = body.pop("dry_run", False)
    if not isinstance(dry_run, bool):
        raise InvalidRequest("dry_run must be true or false")
    spec = parse_spec(body)
    control = request.app[CONTROL_KEY]
    if dry_run:
        return _json({"plan": await control.plan_rollout(spec)})
    return _json({"rollout": await control.start_rollout(spec, actor=_actor(request, caller))},
                 status=201)


async def show_rollout(request: web.Request) -> web.Response:
    authorize(request, "read")
    out = await request.app[CONTROL_KEY].rollout(_rollout_id(request), events=True)
    return _json({"rollout": out})


async def rollout_command(request: web.Request) -> web.Response:
    caller = authorize(request, "admin")
    verb = request.match_info["command"]
    if verb not in VERBS:
        raise NotFound(f"unknown rollout command {verb!r} (one of {', '.join(VERBS)})")
    out = await request.app[CONTROL_KEY].command(_rollout_id(request), verb,
                                                 actor=_actor(request, caller))
    return _json({"rollout": out})


async def rollout_command_other(request: web.Request) -> web.Response:
    """Any other method on a command path: 404 where the command or the rollout does not
    exist (as for a POST), 405 only for a real command of a real rollout."""
    authorize(request, "read")
    verb = request.match_info["command"]
    if verb not in VERBS:
        raise NotFound(f"unknown rollout command {verb!r} (one of {', '.join(VERBS)})")
    await request.app[CONTROL_KEY].rollout(_rollout_id(request))  # NotFound when unknown
    raise web.HTTPMethodNotAllowed(request.method, ["POST"],
                                   text=f"{request.path} takes POST only")


async def metrics(request: web.Request) -> web.Response:
    authorize(request, "read")
    body = generate_latest(request.app[METRICS_KEY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def setup(app: web.Application, control: ports.FleetControl, *, metrics_registry: CollectorRegistry,
          openapi_doc: dict[str, Any] | None = None) -> None:
    """Add the fleet routes to ``app``, answered by ``control``; ``/metrics`` exposes
    ``metrics_registry``. The caller owns ``control``'s lifetime (``hub/server/app.py``)."""
    app[CONTROL_KEY] = control
    app[METRICS_KEY] = metrics_registry
    app.router.add_get("/v1/nodes", list_nodes)
    app.router.add_get("/v1/nodes/{node}", show_node)
    app.router.add_get("/v1/rollouts", list_rollouts)
    app.router.add_post("/v1/rollouts", create_rollout)
    app.router.add_get("/v1/rollouts/{id}", show_rollout)
    app.router.add_post("/v1/rollouts/{id}/{command}", rollout_command)
    app.router.add_route("*", "/v1/rollouts/{id}/{command}", rollout_command_other)
    app.router.add_get("/metrics", metrics)
    if openapi_doc is not None:
        openapi.add_paths(openapi_doc, fleet_openapi.PATHS, fleet_openapi.SCHEMAS)
