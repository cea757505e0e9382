"""The rollout controller: canary, waves, bake, gates, automatic rollback, persisted.

One task steps every active rollout (see ``hub/rollouts/model.py`` for the states) whenever a
node's state changes and at least every ``rollouts.tick_s``. A step only ever moves a rollout
forward from what the database says, and each decision is written before it is acted on:

* a node's previous version is recorded before its label is first patched, and never again,
  so a rollback after a restart still knows where to go back to;
* labels are set idempotently (a re-run after ``kill -9`` patches nothing that is already set),
  and the desired generation only grows, so no node is ever sent two versions;
* nodes of wave i+1 are touched only after wave i baked and passed its gates.

A failed gate, a node reporting ``failed`` for the new version, or a node not active within
``deadline_s`` rolls every touched node back to its previous version (a compare-and-set on the
label: a node someone else changed meanwhile is left alone), with the cause recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from edge_agent.contract.protocol import model_label
from hub.cluster.base import Cluster, LabelPreconditionFailed, Node
from hub.cluster.selectors import parse_selector
from hub.config import HubSettings
from hub.errors import Conflict, HubError, InvalidRequest, NotFound
from hub.fleet.view import Fleet, combine
from hub.rollouts.desired import Catalog, Dispatcher
from hub.rollouts.gates import Metrics, Verdict, judge, parse_gates
from hub.rollouts.model import NodeEntry, Rollout, RolloutSpec, plan_waves
from hub.rollouts.store import RolloutStore

log = structlog.get_logger(__name__)

VERBS = ("pause", "resume", "promote", "abort", "rollback")
_METRICS = ("p50_ms", "p95_ms", "p99_ms", "error_rate", "fps")
#: Nodes handled between two yields to the event loop when judging a big wave.
_YIELD_EVERY = 250


class UnknownVersion(InvalidRequest):
    code = "unknown_model_version"


class RolloutController:
    """Creates rollouts, steps them, and applies operator commands."""

    def __init__(self, *, settings: HubSettings, store: RolloutStore, cluster: Cluster,
                 fleet: Fleet, dispatcher: Dispatcher, catalog: Catalog,
                 clock: Callable[[], float]) -> None:
        self.settings = settings
        self.store = store
        self.cluster = cluster
        self.fleet = fleet
        self.dispatcher = dispatcher
        self.catalog = catalog
        self.clock = clock
        self.rollouts: dict[int, Rollout] = {}
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()

    def label(self, model: str) -> str:
        return model_label(model, self.settings.cluster.label_prefix)

    # ---------------------------------------------------------------------------- lifecycle
    async def start(self, *, connected: Callable[[], Awaitable[object]] | None = None) -> None:
        """Load active rollouts; step them once ``connected()`` returned and the start-up
        grace passed (so the agents' retained states are in)."""
        for r in await self.store.load(active_only=True, limit=10_000):
            self.rollouts[r.id] = r
            log.info("rollout_resumed", rollout=r.id, state=r.state, wave=r.wave)
        self.fleet.on_state_change.append(lambda _node: self.wake())
        self._task = asyncio.create_task(self._run(connected), name="rollouts")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def wake(self) -> None:
        """Step soon (a node's state changed, a command arrived)."""
        self._wake.set()

    async def _run(self, connected: Callable[[], Awaitable[object]] | None) -> None:
        # until the retained states are in, every node would look offline and be skipped
        if connected is not None:
            await connected()
        await asyncio.sleep(self.settings.rollouts.startup_grace_s)
        self.ready.set()
        log.info("rollouts_ready", active=sum(r.active for r in self.rollouts.values()))
        while True:
            # not asyncio.wait_for: before Python 3.12 it swallows a cancellation that races
            # with the event being set, and then shutdown would wait for this loop forever
            waiter = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({waiter}, timeout=self.settings.rollouts.tick_s)
            finally:
                waiter.cancel()
            self._wake.clear()
            try:
                await self.tick()
            except Exception:
                log.exception("rollout_tick_failed")
                await asyncio.sleep(self.settings.rollouts.tick_s)

    async def tick(self) -> None:
        """One step of every active rollout (tests with a manual clock call this directly)."""
        async with self._lock:
            for r in [r for r in self.rollouts.values() if r.active]:
                for _ in range(4):  # follow quick transitions (applying -> baking) at once
                    before = (r.state, r.wave)
                    await self._step(r)
                    if (r.state, r.wave) == before or not r.active:
                        break

    # ------------------------------------------------------------------------------- create
    def _order(self, nodes: list[Node]) -> list[str]:
        """Online nodes first (a canary must be able to answer), then by name."""
        return [n.name for n in sorted(nodes, key=lambda n: (not self.fleet.online(n.name),
                                                             n.name))]

    async def _baseline(self, model: str, version: str, since: float | None,
                        exclude: frozenset[str] | set[str] = frozenset()) -> Metrics:
        """The nodes not on ``version`` (online, telemetry for ``model``), combined."""
        per: list[Metrics] = []
        for i, n in enumerate(list(self.fleet.nodes)):
            if i % _YIELD_EVERY == _YIELD_EVERY - 1:
                await asyncio.sleep(0)  # thousands of nodes: let telemetry in between
            if n not in exclude and self.fleet.online(n):
                per.append(self.fleet.metrics(n, model, since=since, exclude_version=version))
        return combine(per)

    async def plan(self, spec: RolloutSpec) -> tuple[list[list[str]], dict[str, Node]]:
        """Validate a spec against the registry and the cluster; the waves it would run."""
        try:
            await self.catalog.get(spec.model, spec.version)
        except NotFound as exc:
            raise UnknownVersion(
                f"model {spec.model} version {spec.version} is not in the registry"
            ) from exc
        targets = self.cluster.select(parse_selector(spec.selector))
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
        key = self.label(spec.model)
        async with self._lock:
            self._conflict(spec, set(nodes))
            if dry_run:
                return {"dry_run": True, "model": spec.model, "version": spec.version,
                        "selector": spec.selector, "spec": spec.model_dump(),
                        "waves": [[{"node": n, "current_version": nodes[n].labels.get(key),
                                    "online": self.fleet.online(n)} for n in w]
                                  for w in waves]}
            now = self.clock()
            base = await self._baseline(spec.model, spec.version, None)
            r = Rollout(id=0, spec=spec, waves=len(waves), phase_started_at=now,
                        created_at=now, updated_at=now, created_by=actor,
                        baseline={m: base.get(m) for m in _METRICS})
            for i, wave in enumerate(waves):
                for n in wave:
                    r.nodes[n] = NodeEntry(n, i)
            r.id = await self.store.create(r)
            self.rollouts[r.id] = r
        log.info("rollout_created", rollout=r.id, model=spec.model, version=spec.version,
                 nodes=len(r.nodes), waves=r.waves)
        self.wake()
        return r.as_dict()

    # --------------------------------------------------------------------------------- step
    async def _save(self, r: Rollout, entries: list[NodeEntry] | None = None,
                    event: str | None = None, **detail: Any) -> None:
        r.updated_at = self.clock()
        await self.store.save(r, entries or [], (event, detail) if event else None)
        if event:
            log.info("rollout_" + event, rollout=r.id, state=r.state, wave=r.wave, **detail)

    async def _step(self, r: Rollout) -> None:
        if r.state == "pending":
            r.state, r.wave, r.phase_started_at = "applying", 0, self.clock()
            await self._save(r, event="wave_started", wave_index=0)
        if r.state == "applying":
            await self._applying(r)
        elif r.state == "baking":
            await self._baking(r)
        elif r.state == "waiting":
            await self._waiting(r)
        elif r.state == "rolling_back":
            await self._rolling_back(r)

    def _returning(self, r: Rollout, upto: int) -> list[NodeEntry]:
        """Skipped nodes (of waves up to ``upto``) that are online again: they rejoin now."""
        back = [e for e in r.nodes.values()
                if e.status == "skipped" and e.wave <= upto and self.fleet.online(e.node)]
        for e in back:
            e.status, e.wave, e.error = "planned", r.wave, None
        return back

    def _failure(self, r: Rollout, e: NodeEntry) -> str | None:
        """The error when ``e`` reports the new version failed (after getting its desired)."""
        st = self.fleet.model_state(e.node, r.spec.model)
        if st is None or st.status != "failed" or self.fleet.generation(e.node) < e.generation:
            return None
        if r.spec.version in (st.target_version, st.version):
            return st.error or "failed"
        return None

    async def _applying(self, r: Rollout) -> None:
        now, w = self.clock(), r.wave
        await self._start_planned(r, now)
        applying = [e for e in r.nodes.values() if e.status == "applying"]
        await self._ensure_labels(r, applying)
        cause = await self._observe(r, applying, now)
        if cause is not None:
            await self._rollback(r, cause)
            return
        # all settled? then bake
        upto = [e for e in r.nodes.values() if e.wave <= w]
        if any(e.status in ("planned", "applying") for e in upto):
            r.message = "applying"
            if any(e.status == "planned" for e in upto):
                self.wake()  # more batches to start
            return
        if not any(e.status == "active" for e in upto):
            r.message = "waiting for a node of this wave to come online"
            return
        r.state, r.phase_started_at, r.message = "baking", now, "baking"
        await self._save(r, event="wave_baking", wave_index=w)

    async def _start_planned(self, r: Rollout, now: float) -> None:
        """Start the next batch of planned nodes (and returning ones). Each node's previous
        version is written to the database before its label is ever touched."""
        key = self.label(r.spec.model)
        changed = self._returning(r, r.wave)
        planned = [e for e in r.nodes.values() if e.status == "planned" and e.wave <= r.wave]
        for e in planned[: self.settings.rollouts.apply_batch]:
            node = self.cluster.get(e.node)
            if node is None:
                e.status, e.error = "gone", "no longer selected or deleted"
            elif not self.fleet.online(e.node):
                e.status, e.error = "skipped", "offline when its wave came"
            else:
                if not e.prev_recorded:
                    e.prev_version, e.prev_recorded = node.labels.get(key), True
                e.status, e.applied_at = "applying", now
            changed.append(e)
        if changed:
            await self._save(r, changed)

    async def _ensure_labels(self, r: Rollout, applying: list[NodeEntry]) -> None:
        """Label every applying node with the new version (idempotent: after a restart or a
        failed patch only what is missing is sent), then publish their desired state."""
        key, version = self.label(r.spec.model), r.spec.version
        todo = {e.node: {key: version} for e in applying
                if (n := self.cluster.get(e.node)) is not None and n.labels.get(key) != version}
        if not todo:
            return
        results = await self.cluster.patch_many(todo)
        for name, res in results.items():
            if isinstance(res, HubError):
                log.warning("rollout_patch_failed", rollout=r.id, node=name, error=str(res))
        await self.dispatcher.sync([n for n, res in results.items() if isinstance(res, Node)])

    async def _observe(self, r: Rollout, applying: list[NodeEntry],
                       now: float) -> dict[str, Any] | None:
        """What the applying nodes report; the rollback cause when one failed or is late."""
        spec = r.spec
        changed: list[NodeEntry] = []
        cause: dict[str, Any] | None = None
        for e in applying:
            if e.generation == 0:
                row = self.dispatcher.desired(e.node)
                if row is not None and \
                        row.models.get(spec.model, {}).get("version") == spec.version:
                    e.generation = row.generation
                    changed.append(e)
            error = self._failure(r, e) if e.generation else None
            if error is not None:
                e.status, e.error = "failed", error
                cause = {"reason": "node_failed", "node": e.node, "error": error[:500]}
            elif e.generation and self._active(r, e):
                e.status, e.active_at = "active", now
            elif not self.fleet.online(e.node):
                e.status, e.error = "skipped", "went offline while applying"
            elif e.applied_at is not None and now - e.applied_at > spec.deadline_s:
                e.error = "not active by the deadline"
                cause = {"reason": "deadline", "node": e.node, "metric": "seconds_to_active",
                         "value": round(now - e.applied_at, 3), "limit": spec.deadline_s}
            else:
                continue
            changed.append(e)
            if cause is not None:
                break
        if changed:
            await self._save(r, changed)
        return cause

    def _active(self, r: Rollout, e: NodeEntry) -> bool:
        """The node runs the new version, having applied the desired state that carried it."""
        st = self.fleet.model_state(e.node, r.spec.model)
        return (st is not None and st.status == "active" and st.version == r.spec.version
                and self.fleet.generation(e.node) >= e.generation)

    async def _baking(self, r: Rollout) -> None:
        now, w, spec = self.clock(), r.wave, r.spec
        if any(e.status == "skipped" and e.wave <= w and self.fleet.online(e.node)
               for e in r.nodes.values()):
            r.state = "applying"  # a returning node joins this wave and is judged with it
            await self._save(r, event="node_returned")
            return
        judged = [e for e in r.nodes.values() if e.status == "active" and e.wave <= w]
        changed: list[NodeEntry] = []
        for e in judged:
            error = self._failure(r, e)
            if error is not None:
                e.status, e.error = "failed", error
                await self._save(r, [e])
                await self._rollback(r, {"reason": "node_failed", "node": e.node,
                                         "error": error[:500]})
                return
            if not self.fleet.online(e.node):
                e.status, e.error = "skipped", "went offline while baking"
                changed.append(e)
        if changed:
            await self._save(r, changed)
            judged = [e for e in judged if e.status == "active"]
        verdict, per_node, ready = await self._judge(r, judged)
        if verdict.ok is False:
            await self._rollback(r, {"reason": "gate", **verdict.as_cause()})
            return
        elapsed = now - r.phase_started_at
        if elapsed < spec.bake_s:
            r.message = "baking"
            return
        if spec.gates and not (verdict.ok and len(ready) == len(per_node) and judged):
            r.message = f"waiting for telemetry to judge: {verdict.message or 'too few samples'}"
            if elapsed > spec.bake_s + spec.deadline_s:
                r.state, r.paused_from = "paused", "baking"
                await self._save(r, event="paused", reason=r.message)
            return
        await self._next_wave(r, now, judged=len(judged),
                              group=combine(per_node.values()).as_dict())

    async def _judge(self, r: Rollout, judged: list[NodeEntry]
                     ) -> tuple[Verdict, dict[str, Metrics], dict[str, Metrics]]:
        """The gates over this bake: (verdict, every judged node's figures, those ready).

        A node counts once it sent ``min_samples`` messages: one noisy window decides nothing.
        """
        spec, since = r.spec, r.phase_started_at
        per_node: dict[str, Metrics] = {}
        for i, e in enumerate(judged):
            if i % _YIELD_EVERY == _YIELD_EVERY - 1:
                await asyncio.sleep(0)  # thousands of nodes: let telemetry in between
            per_node[e.node] = self.fleet.metrics(e.node, spec.model, spec.version,
                                                  since=max(since, e.active_at or since))
        gates = parse_gates(spec.gates)
        ready = {n: m for n, m in per_node.items() if m.samples >= spec.min_samples}
        baseline: dict[str, float | None] = dict(r.baseline)
        if any(g.relative for g in gates):
            live = await self._baseline(spec.model, spec.version, since, exclude=set(per_node))
            if live.samples:
                baseline = {m: live.get(m) for m in _METRICS}
        if not ready:
            return Verdict(None, message="too few telemetry samples yet"), per_node, ready
        return judge(gates, ready, combine(ready.values()), baseline), per_node, ready

    async def _next_wave(self, r: Rollout, now: float, **detail: Any) -> None:
        await self._save(r, event="wave_passed", wave_index=r.wave, **detail)
        if r.wave + 1 < r.waves:
            r.wave += 1
            r.state, r.phase_started_at, r.message = "applying", now, "applying"
            await self._save(r, event="wave_started", wave_index=r.wave)
        elif any(e.status == "skipped" for e in r.nodes.values()) and r.spec.offline_wait_s > 0:
            r.state, r.phase_started_at = "waiting", now
            r.message = "waiting for offline nodes to return"
            await self._save(r, event="waiting_for_offline")
        else:
            await self._finish(r, "succeeded", now)

    async def _finish(self, r: Rollout, state: str, now: float, **detail: Any) -> None:
        r.state, r.finished_at, r.paused_from = state, now, None  # type: ignore[assignment]
        skipped = sorted(e.node for e in r.nodes.values() if e.status == "skipped")
        r.message = f"{len(skipped)} nodes were never upgraded (offline)" if skipped else ""
        await self._save(r, event=state, skipped=skipped[:50], **detail)

    async def _waiting(self, r: Rollout) -> None:
        now = self.clock()
        back = self._returning(r, r.waves)
        if back:
            r.state = "applying"
            for e in back:
                e.wave = r.wave
            await self._save(r, back, event="node_returned", nodes=[e.node for e in back])
        elif now - r.phase_started_at >= r.spec.offline_wait_s:
            await self._finish(r, "succeeded", now)

    # ----------------------------------------------------------------------------- rollback
    async def _rollback(self, r: Rollout, cause: dict[str, Any]) -> None:
        r.cause, r.state, r.paused_from = cause, "rolling_back", None
        r.message = "rolling back"
        await self._save(r, event="rollback_started", **cause)
        await self._rolling_back(r)

    async def _rolling_back(self, r: Rollout) -> None:
        key, version = self.label(r.spec.model), r.spec.version
        todo = [e for e in r.nodes.values() if e.prev_recorded and e.status != "rolled_back"]
        if todo:
            results = await self.cluster.patch_many(
                {e.node: {key: e.prev_version} for e in todo},
                expect={e.node: {key: version} for e in todo},
            )
            done: list[NodeEntry] = []
            for e in todo:
                res = results.get(e.node)
                if isinstance(res, LabelPreconditionFailed):
                    e.error = "label changed by someone else; left as it is"
                elif isinstance(res, HubError) or res is None:
                    log.warning("rollback_patch_failed", rollout=r.id, node=e.node,
                                error=str(res))
                    continue  # retried next step
                e.status = "rolled_back"
                done.append(e)
            await self._save(r, done)
            await self.dispatcher.sync([e.node for e in done])
            if len(done) < len(todo):
                return
        await self._finish(r, "rolled_back", self.clock())

    # ----------------------------------------------------------------------------- commands
    async def command(self, rid: int, verb: str, actor: str = "") -> dict[str, Any]:
        """pause, resume, promote, abort or rollback a rollout."""
        if verb not in VERBS:
            raise InvalidRequest(f"unknown command {verb!r} (one of {', '.join(VERBS)})")
        async with self._lock:
            r = self.rollouts.get(rid) or await self.get(rid)
            now = self.clock()
            if verb == "pause":
                if r.state not in ("pending", "applying", "baking", "waiting"):
                    raise Conflict(f"rollout {rid} is {r.state}; only a running one can pause")
                r.paused_from, r.state = r.state, "paused"
                r.message = f"paused by {actor or 'api'}"
                await self._save(r, event="pause", by=actor)
            elif verb == "resume":
                if r.state != "paused":
                    raise Conflict(f"rollout {rid} is {r.state}, not paused")
                await self._save(r, self._unpause(r, now), event="resume", by=actor)
            elif verb == "promote":
                await self._promote(r, now, actor)
            elif verb == "abort":
                if not r.active or r.state == "rolling_back":
                    raise Conflict(f"rollout {rid} is {r.state}; it cannot be aborted")
                r.cause = {"reason": "aborted", "by": actor}
                await self._finish(r, "aborted", now, by=actor)
            else:
                if r.state in ("rolling_back", "rolled_back"):
                    raise Conflict(f"rollout {rid} is already {r.state.replace('_', ' ')}")
                if not r.active:  # a finished one comes back to life to roll back
                    self._conflict(r.spec, set(r.nodes))
                self.rollouts[r.id] = r
                await self._rollback(r, {"reason": "manual", "by": actor})
        self.wake()
        return r.as_dict()

    def _unpause(self, r: Rollout, now: float) -> list[NodeEntry]:
        """Back to the paused state; the bake and the nodes' deadlines start again."""
        r.state, r.paused_from = r.paused_from or "applying", None  # type: ignore[assignment]
        r.phase_started_at, r.message = now, ""
        applying = [e for e in r.nodes.values() if e.status == "applying"]
        for e in applying:
            e.applied_at = now
        return applying

    async def _promote(self, r: Rollout, now: float, actor: str) -> None:
        """End the current bake now (a paused rollout is resumed first)."""
        entries = self._unpause(r, now) if r.state == "paused" else []
        if r.state in ("pending", "applying", "baking"):
            await self._save(r, entries, event="promoted", by=actor)
            await self._next_wave(r, now, promoted=True)
        elif r.state == "waiting":
            await self._save(r, entries)
            await self._finish(r, "succeeded", now, promoted=True)
        else:
            raise Conflict(f"rollout {r.id} is {r.state}; nothing to promote")

    # ------------------------------------------------------------------------------ queries
    async def get(self, rid: int) -> Rollout:
        r = self.rollouts.get(rid)
        if r is not None:
            return r
        found = await self.store.load(rid=rid)
        if not found:
            raise NotFound(f"rollout {rid} not found")
        return found[0]

    async def recent(self, limit: int = 100) -> list[Rollout]:
        """The latest rollouts, newest first (finished ones too)."""
        return await self.store.load(limit=limit)

    def assigned(self, model: str, version: str) -> list[str]:
        """Nodes labelled with, or in an active rollout towards, ``model`` ``version``."""
        key = self.label(model)
        nodes = {n.name for n in self.cluster.nodes().values() if n.labels.get(key) == version}
        for r in self.rollouts.values():
            if r.active and r.spec.model == model and r.spec.version == version:
                nodes |= set(r.nodes)
            if r.active and r.spec.model == model:
                nodes |= {e.node for e in r.nodes.values() if e.prev_version == version}
        return sorted(nodes)
