"""The rollout controller: the task that steps every active rollout, creation, commands, queries.

One task steps every active rollout whenever it is woken (a node's state changed, a rollout was
created or commanded) and at least every ``rollouts.tick_s``; how a step moves a rollout, and
why it is safe across a ``kill -9``, is the state machine's business (``hub/rollouts/
machine.py``). The controller holds the set of active rollouts and the one lock under which
steps, creations and commands take turns, so two of them never move the same rollout at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from hub.cluster.base import Node
from hub.cluster.selectors import parse_selector
from hub.errors import Conflict, InvalidRequest, NotFound
from hub.fleet import aggregate as figures
from hub.rollouts import machine
from hub.rollouts.gates import (
    SHADOW_METRICS,
    Gate,
    baseline_classes,
    baseline_value,
    judge,
    parse_gates,
)
from hub.rollouts.model import NodeEntry, Rollout, RolloutSpec, plan_waves

log = structlog.get_logger(__name__)

VERBS = ("pause", "resume", "promote", "abort", "rollback")
#: Steps of one rollout per tick, so quick transitions (applying -> baking) follow at once.
_STEPS_PER_TICK = 4
#: Ended rollouts ``/metrics`` keeps exporting (the newest, for up to ``ENDED_KEPT_S``), so
#: that a dashboard sees their end: a series that vanishes with the rollout marks nothing.
ENDED_KEPT = 50
ENDED_KEPT_S = 86400.0
#: How long ``aclose`` lets a step in progress finish (a wave's label patches on a large
#: fleet take seconds) before cancelling it; within Kubernetes' default 30 s grace period.
STOP_WAIT_S = 15.0


class UnknownVersion(InvalidRequest, code="unknown_model_version"):
    """A rollout of a version the registry does not hold."""


class RolloutController:
    """Creates rollouts, steps them, and applies operator commands."""

    def __init__(self, parts: machine.Parts) -> None:
        self.parts = parts
        self.machine = machine.RolloutMachine(parts, wake=self.wake)
        self.rollouts: dict[int, Rollout] = {}
        #: Rollouts that had ended before this process started (``recently_ended``).
        self._ended: dict[int, Rollout] = {}
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()
        #: Whether this process steps rollouts (the leader); a follower reads them from the
        #: database (``refresh``) and forwards commands.
        self.leading = False

    # ---------------------------------------------------------------------------- lifecycle
    async def start(self, *, connected: Callable[[], Awaitable[object]] | None = None) -> None:
        """Load active rollouts; step them once ``connected()`` returned and the start-up
        grace passed (so the agents' retained states are in)."""
        async with self._lock:
            self.rollouts = {}
            await self.refresh()
            for r in self.rollouts.values():
                log.info("rollout_resumed", rollout=r.id, state=r.state, wave=r.wave)
            self.leading = True
        self._task = asyncio.create_task(self._run(connected), name="rollouts")

    async def refresh(self) -> None:
        """Active and recently ended rollouts from the database (at start, and on a follower
        periodically, for ``active``, ``recently_ended`` and ``assigned``)."""
        active = {r.id: r for r in await self.parts.store.load(active_only=True, limit=10_000)}
        ended = await self.parts.store.load(limit=ENDED_KEPT)
        self.rollouts = active
        self._ended = {r.id: r for r in ended if not r.active}

    async def aclose(self) -> None:
        """Stop stepping (a leader stepping down, or shutdown); ``start`` again to resume.

        A step in progress finishes first (up to ``STOP_WAIT_S``): a transition it made in
        memory is written with it, so what the API last showed is what a restart resumes
        from. One that takes longer is cancelled; its rollouts resume from what it wrote.
        """
        self.leading = False
        self.ready.clear()
        task, self._task = self._task, None
        if task is None:
            return
        # tick() and operator commands hold the lock for their whole step
        try:
            await asyncio.wait_for(self._lock.acquire(), STOP_WAIT_S)
            locked = True
        except TimeoutError:
            locked = False
            log.warning("rollouts_stop_cut_short", waited_s=STOP_WAIT_S)
        try:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        finally:
            if locked:
                self._lock.release()

    def wake(self) -> None:
        """Step soon (a node's state changed, a command arrived)."""
        self._wake.set()

    async def _run(self, connected: Callable[[], Awaitable[object]] | None) -> None:
        # until the retained states are in, every node would look offline and be skipped
        if connected is not None:
            await connected()
        await asyncio.sleep(self.parts.settings.rollouts.startup_grace_s)
        self.ready.set()
        log.info("rollouts_ready", active=sum(r.active for r in self.rollouts.values()))
        while True:
            # not asyncio.wait_for: before Python 3.12 it swallows a cancellation that races
            # with the event being set, and then shutdown would wait for this loop forever
            waiter = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({waiter}, timeout=self.parts.settings.rollouts.tick_s)
            finally:
                waiter.cancel()
            self._wake.clear()
            try:
                await self.tick()
            except Exception:
                log.exception("rollout_tick_failed")
                await asyncio.sleep(self.parts.settings.rollouts.tick_s)

    async def tick(self) -> None:
        """One step of every active rollout (tests with a manual clock call this directly)."""
        async with self._lock:
            for r in [r for r in self.rollouts.values() if r.active]:
                for _ in range(_STEPS_PER_TICK):
                    before = (r.state, r.wave)
                    await self.machine.step(r)
                    if (r.state, r.wave) == before or not r.active:
                        break

    # ------------------------------------------------------------------------------- create
    def _order(self, nodes: list[Node]) -> list[str]:
        """Online nodes first (a canary must be able to answer), then by name."""
        return [n.name for n in sorted(nodes, key=lambda n: (not self.parts.fleet.online(n.name),
                                                             n.name))]

    async def plan(self, spec: RolloutSpec) -> tuple[list[list[str]], dict[str, Node]]:
        """Validate a spec against the registry and the cluster; the waves it would run."""
        try:
            await self.parts.catalog.get(spec.model, spec.version)
        except NotFound as exc:
            raise UnknownVersion(
                f"model {spec.model} version {spec.version} is not in the registry"
            ) from exc
        targets = self.parts.cluster.select(parse_selector(spec.selector))
        if not targets:
            raise InvalidRequest(f"selector {spec.selector!r} matches no camera nodes")
        waves = plan_waves(spec, self._order(targets))
        return waves, {n.name: n for n in targets}

    def _conflict(self, spec: RolloutSpec, names: set[str]) -> None:
        for other in self.rollouts.values():
            if other.active and other.spec.model == spec.model:
                overlap = sorted(names & set(other.nodes))
                if overlap:
                    raise Conflict(
                        f"rollout {other.id} of {spec.model} ({other.state}) already covers "
                        f"nodes {', '.join(overlap[:5])}{'…' if len(overlap) > 5 else ''}; "
                        "abort or finish it first"
                    )

    async def create(self, spec: RolloutSpec, *, dry_run: bool = False,
                     actor: str = "") -> dict[str, Any]:
        """Start a rollout (or describe its plan with ``dry_run``); nothing changes on error."""
        parse_gates(spec.gates)
        waves, nodes = await self.plan(spec)
        key = self.machine.label(spec.model)
        async with self._lock:
            self._conflict(spec, set(nodes))
            if dry_run:
                return {"dry_run": True, "model": spec.model, "version": spec.version,
                        "selector": spec.selector, "spec": spec.model_dump(),
                        "shadow": spec.shadow.model_dump() if spec.shadow else None,
                        "waves": [[{"node": n, "current_version": nodes[n].labels.get(key),
                                    "online": self.parts.fleet.online(n)} for n in w]
                                  for w in waves]}
            now = self.parts.clock()
            base = await self.machine.baseline(spec.model, spec.version, None)
            r = Rollout(id=0, spec=spec, waves=len(waves), phase_started_at=now,
                        created_at=now, updated_at=now, created_by=actor,
                        baseline=machine.snapshot(base))
            for i, wave in enumerate(waves):
                for n in wave:
                    r.nodes[n] = NodeEntry(n, i)
            r.id = await self.parts.store.create(r)
            self.rollouts[r.id] = r
        log.info("rollout_created", rollout=r.id, model=spec.model, version=spec.version,
                 nodes=len(r.nodes), waves=r.waves)
        self.wake()
        return r.as_dict()

    # ----------------------------------------------------------------------------- commands
    async def command(self, rid: int, verb: str, actor: str = "") -> dict[str, Any]:
        """pause, resume, promote, abort or rollback a rollout."""
        if verb not in VERBS:
            raise InvalidRequest(f"unknown command {verb!r} (one of {', '.join(VERBS)})")
        transitions = {"pause": self.machine.pause, "resume": self.machine.resume,
                       "promote": self.machine.promote, "abort": self.machine.abort,
                       "rollback": self.machine.roll_back}
        async with self._lock:
            r = self.rollouts.get(rid) or await self.get(rid)
            if verb == "rollback":
                self._revive(r)
            await transitions[verb](r, self.parts.clock(), actor)
        self.wake()
        return r.as_dict()

    def _revive(self, r: Rollout) -> None:
        """Let ``r`` roll back: a finished one comes back to life, unless another active
        rollout of the model covers its nodes now."""
        if r.state in ("rolling_back", "rolled_back"):
            raise Conflict(f"rollout {r.id} is already {r.state.replace('_', ' ')}")
        if not r.active:
            self._conflict(r.spec, set(r.nodes))
        self.rollouts[r.id] = r

    # ------------------------------------------------------------------------------ queries
    async def get(self, rid: int) -> Rollout:
        """The rollout (on the leader, active ones from memory; else from the database)."""
        r = self.rollouts.get(rid) if self.leading else None
        if r is not None:
            return r
        found = await self.parts.store.load(rid=rid)
        if not found:
            raise NotFound(f"rollout {rid} not found")
        return found[0]

    async def recent(self, limit: int = 100) -> list[Rollout]:
        """The latest rollouts, newest first (finished ones too)."""
        return await self.parts.store.load(limit=limit)

    async def progress(self, r: Rollout) -> dict[str, Any]:
        """Where ``r`` stands now, read only (``GET /v1/rollouts/{id}``, ``rollout status``):
        its wave as ``number`` of ``of`` (1-based; wave 1 is the canary when it has one), the
        bake's elapsed and remaining seconds, each gate's current value against its limit,
        judged exactly as the state machine judges it, and the wave's figures beside the
        baseline's. Gates have values only while the wave is applying, baking or paused."""
        spec, now = r.spec, self.parts.clock()
        state = r.paused_from if r.state == "paused" else r.state
        out: dict[str, Any] = {
            "now": now, "state": r.state,
            "wave": {"number": min(r.wave + 1, r.waves), "of": r.waves,
                     "canary": has_canary(spec) and r.wave == 0},
            "has_canary": has_canary(spec), "bake": None, "gates": [], "judged": None,
            "canary": None, "baseline": {k: v for k, v in r.baseline.items() if k != "classes"},
        }
        if r.state == "baking":
            elapsed = max(0.0, now - r.phase_started_at)
            out["bake"] = {"bake_s": spec.bake_s, "elapsed_s": round(elapsed, 3),
                           "remaining_s": round(max(0.0, spec.bake_s - elapsed), 3)}
        gates = [g for g in parse_gates(spec.gates) if g.metric not in SHADOW_METRICS]
        if state not in ("applying", "baking"):
            why = "not judged: the rollout ended" if not r.active else "judged while a wave bakes"
            out["gates"] = [{**gate_row(g, None, {}, {}), "message": why} for g in gates]
            return out
        judged = [e for e in r.nodes.values() if e.status == "active" and e.wave <= r.wave]
        per_node, ready, baseline = await self.machine.wave_figures(r, judged)
        if not any(g.relative or g.metric == "class_shift" for g in gates):
            live = await self.machine.baseline(spec.model, spec.version, r.phase_started_at,
                                               exclude=set(per_node))
            if live.samples:
                baseline.update({k: v for k, v in machine.snapshot(live).items()
                                 if v is not None})
        group = figures.combine(ready.values()) if ready else None
        out["gates"] = [gate_row(g, group, ready, baseline) for g in gates]
        out["judged"] = {"nodes": len(judged), "ready": len(ready),
                         "samples": sum(m.samples for m in ready.values()),
                         "min_samples": spec.min_samples}
        out["canary"] = group.as_dict() if group is not None else None
        out["baseline"] = {k: v for k, v in baseline.items() if k != "classes"}
        return out

    def active(self) -> list[Rollout]:
        """The rollouts in an active state."""
        return [r for r in list(self.rollouts.values()) if r.active]

    def recently_ended(self) -> list[Rollout]:
        """Up to ``ENDED_KEPT`` rollouts that ended within ``ENDED_KEPT_S``, newest first."""
        now = self.parts.clock()
        ended = {**self._ended, **{r.id: r for r in list(self.rollouts.values())}}
        keep = sorted((r for r in ended.values() if not r.active and r.finished_at is not None
                       and now - r.finished_at <= ENDED_KEPT_S),
                      key=lambda r: -(r.finished_at or 0.0))
        return keep[:ENDED_KEPT]

    def assigned(self, model: str, version: str) -> list[str]:
        """Nodes labelled with, or in an active rollout towards, ``model`` ``version``."""
        key = self.machine.label(model)
        labelled = self.parts.cluster.nodes().values()
        nodes = {n.name for n in labelled if n.labels.get(key) == version}
        for r in self.rollouts.values():
            if r.active and r.spec.model == model and r.spec.version == version:
                nodes |= set(r.nodes)
            if r.active and r.spec.model == model:
                nodes |= {e.node for e in r.nodes.values() if e.prev_version == version}
        return sorted(nodes)


def has_canary(spec: RolloutSpec) -> bool:
    """Whether the rollout's first wave is a canary (``plan_waves``' rule)."""
    return spec.canary_percent is not None or (spec.canary or 0) > 0


def gate_row(gate: Gate, group: figures.Metrics | None, ready: dict[str, figures.Metrics],
             baseline: dict[str, Any]) -> dict[str, Any]:
    """One gate now: its value (the worst node's for an absolute gate, the wave's for a
    relative one or ``class_shift``), the limit it is held to, and ``ok`` as ``judge`` decides
    it on the same figures (None: not judged yet, ``message`` says why)."""
    row: dict[str, Any] = {"gate": str(gate), "metric": gate.metric, "op": gate.op,
                           "threshold": gate.threshold, "relative": gate.relative,
                           "value": None, "limit": None, "baseline": None, "node": None,
                           "ok": None, "message": "too few telemetry samples yet"}
    if gate.metric == "class_shift":
        row["limit"] = gate.threshold
        base = baseline_classes(baseline)
        if group is not None and base:
            row["value"] = figures.total_variation(group.classes, base)
    elif gate.relative:
        row["baseline"] = baseline_value(baseline, gate.metric)
        row["limit"] = gate.limit(row["baseline"])
        row["value"] = group.get(gate.metric) if group is not None else None
    else:
        row["limit"] = gate.threshold
        values = [(m.get(gate.metric), n) for n, m in sorted(ready.items())]
        known = [(v, n) for v, n in values if v is not None]
        if known:
            pick = max if gate.op == "<=" else min
            row["value"], row["node"] = pick(known, key=lambda vn: vn[0])
    if group is None:
        return row
    verdict = judge([gate], ready, group, baseline)
    row["ok"], row["message"] = verdict.ok, verdict.message
    return row
