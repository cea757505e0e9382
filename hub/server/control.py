"""The rollout side of the hub, assembled: cluster, MQTT, fleet, desired state, rollouts.

``ControlPlane`` is the composition root of the rollout side. It builds every part and hands
each the callbacks it needs through its constructor; the parts that must speak up the layers
do so only through these callbacks, which end here and go to the part above:

* the cluster's label events go to the dispatcher (the one trigger of a desired-state sync);
* the MQTT link's acknowledgements of desired messages go to the dispatcher;
* the fleet's node state changes wake the rollout controller.

``start`` starts the parts in dependency order (database, then the node view, then MQTT so
retained states flow in, then leadership) on an ``AsyncExitStack``, which ``aclose`` unwinds in
reverse. The leader-only parts, the dispatcher (which catches up with the labels) and the rollout
controller (after a grace period), start when this process is elected (at once with SQLite) and
stop when it loses leadership (``hub.storage.leader``). Until then, and on every follower, the
rollouts and desired rows are read from the database every ``FOLLOW_S``, rollout commands are
recorded there for the leader (``_forward``), and label patches and desired messages are
refused by the guards set on the cluster and the dispatcher.
The HTTP API asks it questions through the methods of ``hub.api.ports.FleetControl``;
``is_assigned`` is what the registry asks before deleting a version.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import structlog

from hub.cluster.base import Cluster, Listener, Node, NodeEvent, StaticCluster
from hub.cluster.kubernetes import KubernetesCluster
from hub.cluster.selectors import Selector
from hub.config import ClusterSettings, HubSettings
from hub.errors import HubError, InvalidRequest
from hub.fleet.view import Fleet
from hub.rollouts import controller, machine
from hub.rollouts.desired import Catalog, Dispatcher, assigned_models
from hub.rollouts.model import Rollout, RolloutSpec
from hub.rollouts.store import Command, RolloutStore
from hub.storage.leader import make_leadership
from hub.transport.mqtt import HubMqtt

log = structlog.get_logger(__name__)

#: Seconds between a follower's reads of the rollouts and desired rows.
FOLLOW_S = 1.0
#: Seconds a follower waits for the leader to take a forwarded command, then as long again for
#: its answer.
FORWARD_WAIT_S = 15.0


class NoLeader(HubError, code="no_leader", http_status=503):
    """No leader took a forwarded rollout command in time (nothing was done; retry)."""


def forwarded_error(err: dict[str, Any]) -> HubError:
    """The leader's refusal of a forwarded command, raised on the follower as it was."""
    cls = type("ForwardedError", (HubError,), {}, code=str(err.get("code", "hub_error")),
               http_status=int(err.get("status", 400)))
    out: HubError = cls(str(err.get("message", "")))
    return out


def make_cluster(settings: ClusterSettings, *, on_change: Listener | None = None) -> Cluster:
    """The backend ``settings.backend`` names, telling ``on_change`` about label changes."""
    if settings.backend == "kubernetes":
        return KubernetesCluster(settings, on_change=on_change)
    return StaticCluster(settings, on_change=on_change)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _stop(part: str, close: Callable[[], Awaitable[object]]) -> None:
    """Stop one part; a failure is logged and the others are still stopped."""
    try:
        await close()
    except Exception:
        log.exception("control_plane_stop_failed", part=part)


class ControlPlane:
    """Everything the rollouts need, with one start and one stop."""

    def __init__(self, settings: HubSettings, catalog: Catalog, *,
                 clock: Callable[[], float] = time.time,
                 mqtt_client_id: str | None = None) -> None:
        self.settings = settings
        self.fleet = Fleet(settings.telemetry, clock, on_state_change=self._node_state_changed)
        self.cluster = make_cluster(settings.cluster, on_change=self._labels_changed)
        self.store = RolloutStore.from_settings(settings.storage, settings.secret_files)
        self.leadership = make_leadership(self.store.db, lease_s=settings.storage.leader_lease_s,
                                          on_elected=self._lead, on_lost=self._follow)
        self.replicated = self.store.db.dialect == "postgresql"
        self.cluster.write_guard = self.leadership.check
        self.mqtt = HubMqtt(settings.mqtt, on_state=self.fleet.on_state,
                            on_telemetry=self.fleet.on_telemetry,
                            on_invalid=self.fleet.on_invalid, on_ack=self._desired_acked,
                            client_id=mqtt_client_id)
        self.dispatcher = Dispatcher(
            store=self.store, cluster=self.cluster, mqtt=self.mqtt, catalog=catalog,
            fleet=self.fleet, public_url=settings.public_url(),
            label_prefix=settings.cluster.label_prefix, guard=self.leadership.check,
        )
        self.controller = controller.RolloutController(machine.Parts(
            settings=settings, store=self.store, cluster=self.cluster, fleet=self.fleet,
            dispatcher=self.dispatcher, catalog=catalog, clock=clock,
        ))
        self._stack = contextlib.AsyncExitStack()
        self._tasks: list[asyncio.Task[None]] = []

    # ------------------------------------------------------- callbacks from the lower parts
    def _labels_changed(self, events: list[NodeEvent]) -> None:
        self.dispatcher.nodes_changed(events)

    def _desired_acked(self, token: Any) -> None:
        self.dispatcher.acknowledged(token)

    def _node_state_changed(self, node: str) -> None:
        self.controller.wake()

    # ---------------------------------------------------------------------------- lifecycle
    async def start(self, *, mqtt_wait_s: float = 0.0) -> None:
        """Start every part; on failure, stop what was started and re-raise."""
        async with contextlib.AsyncExitStack() as stack:
            await self.store.open()
            stack.push_async_callback(_stop, "store", self.store.close)
            await self.cluster.start()
            stack.push_async_callback(_stop, "cluster", self.cluster.aclose)
            await self.mqtt.start(wait_s=mqtt_wait_s)
            stack.push_async_callback(_stop, "mqtt", self.mqtt.aclose)
            if self.replicated:
                await self.controller.refresh()
                self.dispatcher.rows = await self.store.load_desired()
                follow = asyncio.create_task(self._follow_loop(), name="hub-follow")
                stack.push_async_callback(_cancel, follow)
            await self.leadership.start()
            stack.push_async_callback(_stop, "leadership", self.leadership.aclose)
            self._stack = stack.pop_all()
        log.info("control_plane_started", nodes=len(self.cluster.nodes()),
                 active_rollouts=len(self.controller.active()))

    async def _lead(self) -> None:
        """Elected (at start with SQLite): the dispatcher catches up, the controller steps."""
        await self.dispatcher.start()
        await self.controller.start(connected=self._connected)
        if self.replicated:
            self._tasks.append(asyncio.create_task(self._serve_commands(), name="hub-commands"))

    async def _follow(self) -> None:
        """Leadership lost (or shutdown): stop the leader-only parts, keep serving reads."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            await _cancel(task)
        await _stop("controller", self.controller.aclose)
        await _stop("dispatcher", self.dispatcher.aclose)

    async def _follow_loop(self) -> None:
        """On a follower, keep the rollouts and desired rows as the leader wrote them."""
        while True:
            await asyncio.sleep(FOLLOW_S)
            if self.leadership.leading:
                continue
            try:
                await self.controller.refresh()
                self.dispatcher.rows = await self.store.load_desired()
            except Exception as exc:
                log.warning("follower_refresh_failed", error=str(exc)[:200])

    async def _serve_commands(self) -> None:
        """On the leader: execute the rollout commands followers recorded."""
        while True:
            try:
                waiting = await self.store.commands_waiting()
                for cmd in await self.store.take_commands() if waiting else []:
                    await self.store.finish_command(cmd.id, await self._execute(cmd))
            except Exception as exc:
                log.warning("forwarded_commands_failed", error=str(exc)[:200])
            await asyncio.sleep(0.1)

    async def _execute(self, cmd: Command) -> dict[str, Any]:
        try:
            if cmd.kind == "create":
                spec = RolloutSpec.model_validate(cmd.body["spec"])
                created = await self.controller.create(spec, actor=cmd.actor)
                rid = int(created["id"])
            else:
                await self.controller.command(int(cmd.rollout_id or 0), cmd.kind,
                                              actor=cmd.actor)
                rid = int(cmd.rollout_id or 0)
        except HubError as exc:
            return {"error": {"code": exc.code, "message": str(exc), "status": exc.http_status}}
        log.info("forwarded_command_done", command=cmd.id, kind=cmd.kind, rollout=rid)
        return {"ok": {"id": rid}}

    async def _forward(self, kind: str, rid: int | None, body: dict[str, Any],
                       actor: str) -> int:
        """Record a rollout command for the leader and wait for its answer; the rollout id."""
        cid = await self.store.enqueue(kind, rid, body, actor)
        deadline = time.monotonic() + FORWARD_WAIT_S
        while True:
            taken, result = await self.store.command_result(cid)
            if result is not None:
                break
            late = time.monotonic() > deadline
            if late and not taken and await self.store.withdraw(
                    cid, {"error": {"code": NoLeader.code, "status": 503}}):
                raise NoLeader(f"no leader took the command within {FORWARD_WAIT_S:g} s; "
                               "nothing was done, retry")
            if time.monotonic() > deadline + FORWARD_WAIT_S:
                raise NoLeader(f"the leader took command {cid} but has not answered; see "
                               "the rollout's events before retrying")
            await asyncio.sleep(0.1)
        if "error" in result:
            raise forwarded_error(result["error"])
        return int(result["ok"]["id"])

    async def readiness(self) -> dict[str, Any]:
        """``/readyz``: whether the database answers, and this process's role."""
        try:
            await asyncio.wait_for(self.store.db.run(lambda c: c.execute("SELECT 1")), 5.0)
            database = "ok"
        except Exception as exc:  # logged, not shown: it may name hosts and users
            log.warning("readiness_database_failed", error=str(exc)[:200])
            database = "unavailable"
        return {"status": "ready" if database == "ok" else "unready", "database": database,
                "leader": self.leadership.leading, "epoch": self.leadership.epoch}

    async def _connected(self) -> None:
        """Wait (as long as it takes, logging) for the broker connection."""
        while not await self.mqtt.wait_connected(10.0):
            log.warning("rollouts_waiting_for_mqtt", host=self.settings.mqtt.host,
                        port=self.settings.mqtt.port)

    async def aclose(self) -> None:
        """Stop in reverse order (idempotent)."""
        stack, self._stack = self._stack, contextlib.AsyncExitStack()
        await stack.aclose()

    async def __aenter__(self) -> ControlPlane:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------ for the registry and API
    def is_assigned(self, name: str, version: str) -> list[str]:
        """Nodes that run or are being moved to/from ``name`` ``version`` (registry deletes)."""
        return self.controller.assigned(name, version)

    def nodes(self, selector: Selector) -> list[dict[str, Any]]:
        """Every camera node matching ``selector``, as the API shows it."""
        return [self._node_view(n) for n in self.cluster.select(selector)]

    def versions(self, nodes: Iterable[str]) -> list[dict[str, Any]]:
        """Per model version over ``nodes``: node count and merged figures (the API's
        ``versions`` beside ``nodes``)."""
        return [{"model": model, "version": version, "nodes": count, **m.as_dict()}
                for (model, version), (count, m) in self.fleet.versions(nodes).items()]

    def node(self, name: str) -> dict[str, Any] | None:
        """One camera node as the API shows it; None when the hub does not see it."""
        node = self.cluster.get(name)
        return self._node_view(node) if node is not None else None

    async def rollouts(self, limit: int) -> list[dict[str, Any]]:
        """Summaries of the latest rollouts, newest first."""
        return [r.summary() for r in await self.controller.recent(limit)]

    async def rollout(self, rid: int, *, events: bool = False) -> dict[str, Any]:
        """A rollout with each node's live view and where it stands (``progress``: wave, bake,
        every gate's current value; ``controller.progress``), and with ``events`` its event
        log."""
        r = await self.controller.get(rid)
        out = self._rollout_view(r)
        out["progress"] = await self.controller.progress(r)
        if events:
            out["events"] = await self.store.events(r.id)
        return out

    async def plan_rollout(self, spec: RolloutSpec) -> dict[str, Any]:
        """The waves ``spec`` would run, changing nothing."""
        return await self.controller.create(spec, dry_run=True)

    async def start_rollout(self, spec: RolloutSpec, *, actor: str) -> dict[str, Any]:
        """Start a rollout (on a follower, through the leader); its live view."""
        if self.controller.leading:
            rid = int((await self.controller.create(spec, actor=actor))["id"])
        else:
            rid = await self._forward("create", None, {"spec": spec.model_dump(mode="json")},
                                      actor)
        return self._rollout_view(await self.controller.get(rid))

    async def command(self, rid: int, verb: str, *, actor: str) -> dict[str, Any]:
        """Apply an operator command (on a follower, through the leader); the rollout's live
        view after it."""
        if self.controller.leading:
            await self.controller.command(rid, verb, actor=actor)
        else:
            if verb not in controller.VERBS:
                raise InvalidRequest(f"unknown command {verb!r} (one of "
                                                f"{', '.join(controller.VERBS)})")
            await self.controller.get(rid)  # 404 here, not from the leader
            await self._forward(verb, rid, {}, actor)
        return self._rollout_view(await self.controller.get(rid))

    def _node_view(self, node: Node) -> dict[str, Any]:
        """One node for the API and the CLI."""
        prefix = self.settings.cluster.label_prefix
        row = self.dispatcher.desired(node.name)
        health = self.fleet.describe(node.name)
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
            "cameras": health.get("cameras", []),
        }

    def _rollout_view(self, r: Rollout) -> dict[str, Any]:
        """A rollout with each node's live view (version running, health on the new one)."""
        out = r.as_dict()
        model, version = r.spec.model, r.spec.version
        for entry in out["nodes"]:
            name = entry["node"]
            st = self.fleet.model_state(name, model)
            m = self.fleet.metrics(name, model, version, since=entry["active_at"]) \
                if entry["status"] == "active" else None
            entry["live"] = {
                "online": self.fleet.online(name),
                "running": st.version if st is not None else None,
                "status": st.status if st is not None else None,
                "metrics": m.as_dict() if m is not None and m.samples else None,
            }
        return out
