"""The REST API of the rollout side: nodes, rollouts and their commands, ``/metrics``.

Hooked into the hub's app by ``setup(app, registry)`` (called from ``hub/server/app.py``). Errors
and
bearer-token checks are the registry API's (``hub/api/httputil.py``): every mutating route needs the
token, bad input is a 4xx JSON error and changes nothing. The paths are added to the hub's
OpenAPI document (``hub/api/fleet_openapi.py``).

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

from hub.api.httputil import SETTINGS_KEY, authorize
from hub.cluster.base import Node
from hub.cluster.selectors import parse_selector
from hub.errors import InvalidRequest, NotFound
from hub.rollouts.controller import VERBS
from hub.rollouts.desired import Catalog, assigned_models
from hub.rollouts.model import Rollout, parse_spec
from hub.server.control import ControlPlane
from hub.server.metrics import FleetCollector

log = structlog.get_logger(__name__)

CONTROL_KEY = web.AppKey("hub_control_plane", ControlPlane)
METRICS_KEY = web.AppKey("hub_fleet_metrics", CollectorRegistry)
_MAX_ACTOR = 64


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _actor(request: web.Request) -> str:
    """Who asked (``X-Actor`` header, informational; the token is the authority)."""
    actor = request.headers.get("X-Actor", "api").strip()[:_MAX_ACTOR]
    return actor if actor.isprintable() else "api"


def _rollout_id(request: web.Request) -> int:
    raw = request.match_info["id"]
    if not raw.isdigit() or len(raw) > 12:
        raise InvalidRequest(f"rollout id must be a positive integer, got {raw!r}")
    return int(raw)


def node_view(control: ControlPlane, node: Node) -> dict[str, Any]:
    """One node for the API and the CLI."""
    prefix = control.settings.cluster.label_prefix
    row = control.dispatcher.desired(node.name)
    health = control.fleet.describe(node.name)
    return {
        "name": node.name,
        "labels": dict(node.labels),
        "assigned": assigned_models(node.labels, prefix),
        "online": health["online"],
        "last_seen": health["last_seen"],
        "generation": {"desired": row.generation if row else 0,
                       "published": bool(row and row.published),
                       "applied": health["generation"]},
        "agent_version": health["agent_version"],
        "providers": health["providers"],
        "models": health["models"],
        "metrics": health["metrics"],
    }


def rollout_view(control: ControlPlane, r: Rollout) -> dict[str, Any]:
    """A rollout with each node's live view (version running, health on the new version)."""
    out = r.as_dict()
    model, version = r.spec.model, r.spec.version
    for entry in out["nodes"]:
        name = entry["node"]
        st = control.fleet.model_state(name, model)
        m = control.fleet.metrics(name, model, version, since=entry["active_at"]) \
            if entry["status"] == "active" else None
        entry["live"] = {
            "online": control.fleet.online(name),
            "running": st.version if st is not None else None,
            "status": st.status if st is not None else None,
            "metrics": m.as_dict() if m is not None and m.samples else None,
        }
    return out


async def list_nodes(request: web.Request) -> web.Response:
    authorize(request, write=False)
    control = request.app[CONTROL_KEY]
    selector = parse_selector(request.query.get("selector", ""))
    nodes = control.cluster.select(selector)
    return _json({"nodes": [node_view(control, n) for n in nodes]})


async def show_node(request: web.Request) -> web.Response:
    authorize(request, write=False)
    control = request.app[CONTROL_KEY]
    node = control.cluster.get(request.match_info["node"])
    if node is None:
        raise NotFound(f"node {request.match_info['node']!r} is not a camera node of this hub")
    return _json(node_view(control, node))


async def list_rollouts(request: web.Request) -> web.Response:
    authorize(request, write=False)
    raw = request.query.get("limit", "50")
    if not raw.isdigit() or not 1 <= int(raw) <= 1000:
        raise InvalidRequest("limit must be an integer in [1, 1000]")
    rollouts = await request.app[CONTROL_KEY].controller.recent(int(raw))
    return _json({"rollouts": [r.summary() for r in rollouts]})


async def create_rollout(request: web.Request) -> web.Response:
    authorize(request, write=True)
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
    result = await control.controller.create(spec, dry_run=dry_run, actor=_actor(request))
    if dry_run:
        return _json({"plan": result})
    r = await control.controller.get(result["id"])
    return _json({"rollout": rollout_view(control, r)}, status=201)


async def show_rollout(request: web.Request) -> web.Response:
    authorize(request, write=False)
    control = request.app[CONTROL_KEY]
    r = await control.controller.get(_rollout_id(request))
    out = rollout_view(control, r)
    out["events"] = await control.store.events(r.id)
    return _json({"rollout": out})


async def rollout_command(request: web.Request) -> web.Response:
    authorize(request, write=True)
    verb = request.match_info["command"]
    if verb not in VERBS:
        raise NotFound(f"unknown rollout command {verb!r} (one of {', '.join(VERBS)})")
    control = request.app[CONTROL_KEY]
    rid = _rollout_id(request)
    await control.controller.command(rid, verb, actor=_actor(request))
    r = await control.controller.get(rid)
    return _json({"rollout": rollout_view(control, r)})


async def metrics(request: web.Request) -> web.Response:
    authorize(request, write=False)
    body = generate_latest(request.app[METRICS_KEY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _has_route(app: web.Application, path: str) -> bool:
    return any(getattr(r, "canonical", None) == path for r in app.router.resources())


def setup(app: web.Application, registry: Catalog, *, control: ControlPlane | None = None,
          openapi: dict[str, Any] | None = None, set_is_assigned: bool = True) -> ControlPlane:
    """Add the fleet routes to ``app`` and run a ``ControlPlane`` with it.

    A control plane built here is started after the registry opens and stopped before it
    closes; one passed in (tests) is left to its owner. With ``set_is_assigned`` the
    registry asks the control plane whether a version it is told to delete is in use.
    """
    owned = control is None
    cp = control or ControlPlane(app[SETTINGS_KEY], registry)
    app[CONTROL_KEY] = cp
    if set_is_assigned and hasattr(registry, "is_assigned"):
        registry.is_assigned = cp.is_assigned
    reg = CollectorRegistry(auto_describe=False)
    reg.register(FleetCollector(cp))
    app[METRICS_KEY] = reg
    app.router.add_get("/v1/nodes", list_nodes)
    app.router.add_get("/v1/nodes/{node}", show_node)
    app.router.add_get("/v1/rollouts", list_rollouts)
    app.router.add_post("/v1/rollouts", create_rollout)
    app.router.add_get("/v1/rollouts/{id}", show_rollout)
    app.router.add_post("/v1/rollouts/{id}/{command}", rollout_command)
    if not _has_route(app, "/metrics"):
        app.router.add_get("/metrics", metrics)
    if openapi is not None:
        from hub.api.fleet_openapi import PATHS, SCHEMAS  # noqa: PLC0415 - doc only
        from hub.api.openapi import add_paths  # noqa: PLC0415

        add_paths(openapi, PATHS, SCHEMAS)
    if owned:

        async def start(app: web.Application) -> None:
            await cp.start()

        async def stop(app: web.Application) -> None:
            await cp.aclose()

        app.on_startup.append(start)
        app.on_shutdown.append(stop)
    return cp
