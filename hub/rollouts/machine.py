"""The rollout state machine: how one rollout moves between its states, one step at a time.

The states are drawn in ``hub/rollouts/model.py``. ``RolloutMachine.step`` moves a rollout on
from what its record says, and every decision is written to the database before it is acted on:

* a node's previous version is recorded before its label is first patched, and never again,
  so a rollback after a restart still knows where to go back to;
* labels are set idempotently (a re-run after ``kill -9`` patches nothing that is already set);
  the desired state follows the labels (``hub/rollouts/desired.py`` hears of every change), and
  its generation only grows, so no node is ever sent two versions;
* nodes of wave i+1 are touched only after wave i baked and passed its gates.

A failed gate, a node reporting ``failed`` for the new version, or a node not active within
``deadline_s`` rolls every touched node back to its previous version (a compare-and-set on the
label: a node someone else changed meanwhile is left alone), with the cause recorded. The
operator's commands (pause, resume, promote, abort) are transitions too and live here; the task,
the lock and the set of rollouts are the controller's (``hub/rollouts/controller.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from edge_agent.contract.protocol import model_label
from hub.cluster.base import Cluster, LabelPreconditionFailed
from hub.config import HubSettings
from hub.errors import Conflict, HubError
from hub.fleet import aggregate as figures
from hub.fleet.view import Fleet
from hub.rollouts import shadowing
from hub.rollouts.desired import Catalog, Dispatcher
from hub.rollouts.gates import Verdict, judge, parse_gates
from hub.rollouts.model import NodeEntry, Rollout
from hub.rollouts.store import RolloutStore

log = structlog.get_logger(__name__)

#: The figures a rollout's baseline records (and relative gates compare against); the record
#: also holds the baseline's class histogram under ``"classes"`` (``class_shift``). Rollouts
#: stored before a figure existed simply lack it: such a gate waits for a live baseline.
METRICS = ("p50_ms", "p95_ms", "p99_ms", "error_rate", "fps", "detections_per_frame",
           "score_p50")


def snapshot(m: figures.Metrics) -> dict[str, Any]:
    """The baseline record of ``m``: every figure of ``METRICS``, and the class histogram."""
    out: dict[str, Any] = {k: m.get(k) for k in METRICS}
    if m.classes:
        out["classes"] = dict(m.classes)
    return out
#: Nodes handled between two yields to the event loop when judging a big wave.
_YIELD_EVERY = 250


@dataclass(frozen=True)
class Parts:
    """What rollouts are planned and stepped against: built once by the composition root
    (``hub/server/control.py``) and shared by the controller and the state machine."""

    settings: HubSettings
    store: RolloutStore
    cluster: Cluster
    fleet: Fleet
    dispatcher: Dispatcher
    #: The registry, asked whether a version exists before a rollout of it starts.
    catalog: Catalog
    clock: Callable[[], float]


class RolloutMachine:
    """Steps rollouts and applies commands to them; the caller holds the controller's lock.

    ``wake`` asks the controller for another step soon (more batches of nodes to start).
    """

    def __init__(self, parts: Parts, *, wake: Callable[[], None]) -> None:
        self.parts = parts
        self._wake = wake
        self.shadow = shadowing.ShadowPhase(
            cluster=parts.cluster, fleet=parts.fleet, desired=parts.dispatcher, clock=parts.clock,
            label_prefix=parts.settings.cluster.label_prefix,
            batch=parts.settings.rollouts.apply_batch, save=self.save)

    def label(self, model: str) -> str:
        """The node label that carries ``model``'s assigned version."""
        return model_label(model, self.parts.settings.cluster.label_prefix)

    async def baseline(self, model: str, version: str, since: float | None,
                       exclude: frozenset[str] | set[str] = frozenset()) -> figures.Metrics:
        """The nodes not on ``version`` (online, telemetry for ``model``), combined."""
        per: list[figures.Metrics] = []
        for i, n in enumerate(list(self.parts.fleet.nodes)):
            if i % _YIELD_EVERY == _YIELD_EVERY - 1:
                await asyncio.sleep(0)  # thousands of nodes: let telemetry in between
            if n not in exclude and self.parts.fleet.online(n):
                per.append(self.parts.fleet.metrics(n, model, since=since, exclude_version=version))
        return figures.combine(per)

    async def save(self, r: Rollout, entries: list[NodeEntry] | None = None,
                   event: str | None = None, **detail: Any) -> None:
        """Write the rollout (and the changed node entries, and an event) to the database."""
        r.updated_at = self.parts.clock()
        await self.parts.store.save(r, entries or [], (event, detail) if event else None)
        if event:
            log.info("rollout_" + event, rollout=r.id, state=r.state, wave=r.wave, **detail)

    # --------------------------------------------------------------------------------- step
    async def step(self, r: Rollout) -> None:
        """One move of ``r`` from the state it is in."""
        if r.state == "pending":
            r.state, r.wave, r.phase_started_at = "applying", 0, self.parts.clock()
            await self.save(r, event="wave_started", wave_index=0)
            if r.spec.shadow is not None:
                await self.shadow.begin(r, r.phase_started_at)
        if r.state == "shadowing":
            await self._shadowing(r)
        elif r.state == "applying":
            await self._applying(r)
        elif r.state == "baking":
            await self._baking(r)
        elif r.state == "waiting":
            await self._waiting(r)
        elif r.state == "rolling_back":
            await self._rolling_back(r)

    async def _shadowing(self, r: Rollout) -> None:
        """The wave's shadow phase (``hub/rollouts/shadowing.py``): switch or roll back."""
        outcome = await self.shadow.step(r)
        if outcome is True:
            r.state, r.phase_started_at, r.message = "applying", self.parts.clock(), "applying"
            await self.save(r)
        elif isinstance(outcome, dict):
            await self.rollback(r, outcome)

    def _returning(self, r: Rollout, upto: int) -> list[NodeEntry]:
        """Skipped nodes (of waves up to ``upto``) that are online again: they rejoin now."""
        back = [e for e in r.nodes.values()
                if e.status == "skipped" and e.wave <= upto and self.parts.fleet.online(e.node)]
        for e in back:
            e.status, e.wave, e.error = "planned", r.wave, None
        return back

    def _failure(self, r: Rollout, e: NodeEntry) -> str | None:
        """The error when ``e`` reports the new version failed (after getting its desired)."""
        fleet = self.parts.fleet
        st = fleet.model_state(e.node, r.spec.model)
        if st is None or st.status != "failed" or fleet.generation(e.node) < e.generation:
            return None
        if r.spec.version in (st.target_version, st.version):
            return st.error or "failed"
        return None

    async def _applying(self, r: Rollout) -> None:
        now, w = self.parts.clock(), r.wave
        await self._start_planned(r, now)
        applying = [e for e in r.nodes.values() if e.status == "applying"]
        await self._ensure_labels(r, applying)
        cause = await self._observe(r, applying, now)
        if cause is not None:
            await self.rollback(r, cause)
            return
        # all settled? then bake
        upto = [e for e in r.nodes.values() if e.wave <= w]
        if any(e.status in ("planned", "applying") for e in upto):
            r.message = "applying"
            if any(e.status == "planned" for e in upto):
                self._wake()  # more batches to start
            return
        if not any(e.status == "active" for e in upto):
            r.message = "waiting for a node of this wave to come online"
            return
        r.state, r.phase_started_at, r.message = "baking", now, "baking"
        await self.save(r, event="wave_baking", wave_index=w)

    async def _start_planned(self, r: Rollout, now: float) -> None:
        """Start the next batch of planned nodes (and returning ones). Each node's previous
        version is written to the database before its label is ever touched."""
        key = self.label(r.spec.model)
        changed = self._returning(r, r.wave)
        planned = [e for e in r.nodes.values() if e.status == "planned" and e.wave <= r.wave]
        for e in planned[: self.parts.settings.rollouts.apply_batch]:
            node = self.parts.cluster.get(e.node)
            if node is None:
                e.status, e.error = "gone", "no longer selected or deleted"
            elif not self.parts.fleet.online(e.node):
                e.status, e.error = "skipped", "offline when its wave came"
            else:
                if not e.prev_recorded:
                    e.prev_version, e.prev_recorded = node.labels.get(key), True
                e.status, e.applied_at = "applying", now
            changed.append(e)
        if changed:
            await self.save(r, changed)

    async def _ensure_labels(self, r: Rollout, applying: list[NodeEntry]) -> None:
        """Label every applying node with the new version (idempotent: after a restart or a
        failed patch only what is missing is sent). The dispatcher hears of each change from
        the cluster and publishes the node's desired state."""
        key, version, cluster = self.label(r.spec.model), r.spec.version, self.parts.cluster
        todo = {e.node: {key: version} for e in applying
                if (n := cluster.get(e.node)) is not None and n.labels.get(key) != version}
        if not todo:
            return
        results = await cluster.patch_many(todo)
        for name, res in results.items():
            if isinstance(res, HubError):
                log.warning("rollout_patch_failed", rollout=r.id, node=name, error=str(res))

    async def _observe(self, r: Rollout, applying: list[NodeEntry],
                       now: float) -> dict[str, Any] | None:
        """What the applying nodes report; the rollback cause when one failed or is late."""
        spec = r.spec
        changed: list[NodeEntry] = []
        cause: dict[str, Any] | None = None
        for e in applying:
            if e.generation == 0 and self._carried(r, e):
                changed.append(e)
            error = self._failure(r, e) if e.generation else None
            if error is not None:
                e.status, e.error = "failed", error
                cause = {"reason": "node_failed", "node": e.node, "error": error[:500]}
            elif e.generation and self._active(r, e):
                e.status, e.active_at = "active", now
            elif not self.parts.fleet.online(e.node):
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
            await self.save(r, changed)
        return cause

    def _carried(self, r: Rollout, e: NodeEntry) -> bool:
        """Record the desired generation that carries the new version to ``e`` (once the
        dispatcher decided it); True when it was just found."""
        row = self.parts.dispatcher.desired(e.node)
        if row is None or row.models.get(r.spec.model, {}).get("version") != r.spec.version:
            return False
        e.generation = row.generation
        return True

    def _active(self, r: Rollout, e: NodeEntry) -> bool:
        """The node runs the new version, having applied the desired state that carried it."""
        st = self.parts.fleet.model_state(e.node, r.spec.model)
        return (st is not None and st.status == "active" and st.version == r.spec.version
                and self.parts.fleet.generation(e.node) >= e.generation)

    async def _baking(self, r: Rollout) -> None:
        now, w, spec = self.parts.clock(), r.wave, r.spec
        if any(e.status == "skipped" and e.wave <= w and self.parts.fleet.online(e.node)
               for e in r.nodes.values()):
            r.state = "applying"  # a returning node joins this wave and is judged with it
            await self.save(r, event="node_returned")
            return
        judged = [e for e in r.nodes.values() if e.status == "active" and e.wave <= w]
        changed: list[NodeEntry] = []
        for e in judged:
            error = self._failure(r, e)
            if error is not None:
                e.status, e.error = "failed", error
                await self.save(r, [e])
                await self.rollback(r, {"reason": "node_failed", "node": e.node,
                                        "error": error[:500]})
                return
            if not self.parts.fleet.online(e.node):
                e.status, e.error = "skipped", "went offline while baking"
                changed.append(e)
        if changed:
            await self.save(r, changed)
            judged = [e for e in judged if e.status == "active"]
        verdict, per_node, ready = await self._judge(r, judged)
        if verdict.ok is False:
            await self.rollback(r, {"reason": "gate", **verdict.as_cause()})
            return
        elapsed = now - r.phase_started_at
        if elapsed < spec.bake_s:
            r.message = "baking"
            return
        if spec.gates and not (verdict.ok and len(ready) == len(per_node) and judged):
            r.message = f"waiting for telemetry to judge: {verdict.message or 'too few samples'}"
            if elapsed > spec.bake_s + spec.deadline_s:
                r.state, r.paused_from = "paused", "baking"
                await self.save(r, event="paused", reason=r.message)
            return
        await self.next_wave(r, now, judged=len(judged),
                             group=figures.combine(per_node.values()).as_dict())

    async def _judge(self, r: Rollout, judged: list[NodeEntry]
                     ) -> tuple[Verdict, dict[str, figures.Metrics], dict[str, figures.Metrics]]:
        """The gates over this bake: (verdict, every judged node's figures, those ready).

        A node counts once it sent ``min_samples`` messages: one noisy window decides nothing.
        """
        per_node, ready, baseline = await self.wave_figures(r, judged)
        if not ready:
            return Verdict(None, message="too few telemetry samples yet"), per_node, ready
        gates = parse_gates(r.spec.gates)
        return judge(gates, ready, figures.combine(ready.values()), baseline), per_node, ready

    async def wave_figures(self, r: Rollout, judged: list[NodeEntry]) -> tuple[
            dict[str, figures.Metrics], dict[str, figures.Metrics], dict[str, Any]]:
        """What this bake's gates are judged on (reads only; ``rollout status`` shows it too):
        every judged node's figures since it went active, those with ``min_samples``, and the
        baseline record (live where a gate compares with it and baseline nodes report)."""
        spec, since = r.spec, r.phase_started_at
        per_node: dict[str, figures.Metrics] = {}
        for i, e in enumerate(judged):
            if i % _YIELD_EVERY == _YIELD_EVERY - 1:
                await asyncio.sleep(0)  # thousands of nodes: let telemetry in between
            per_node[e.node] = self.parts.fleet.metrics(e.node, spec.model, spec.version,
                                                  since=max(since, e.active_at or since))
        gates = parse_gates(spec.gates)
        ready = {n: m for n, m in per_node.items() if m.samples >= spec.min_samples}
        baseline: dict[str, Any] = dict(r.baseline)
        if any(g.relative or g.metric == "class_shift" for g in gates):
            live = await self.baseline(spec.model, spec.version, since, exclude=set(per_node))
            if live.samples:
                # the live baseline's figures where it has them, the snapshot's for the rest
                # (baseline nodes on agents that send no output statistics yet)
                baseline.update({k: v for k, v in snapshot(live).items() if v is not None})
        return per_node, ready, baseline

    async def next_wave(self, r: Rollout, now: float, **detail: Any) -> None:
        """The current wave passed: start the next one, wait for offline nodes, or finish."""
        await self.save(r, event="wave_passed", wave_index=r.wave, **detail)
        if r.wave + 1 < r.waves:
            r.wave += 1
            r.state, r.phase_started_at, r.message = "applying", now, "applying"
            await self.save(r, event="wave_started", wave_index=r.wave)
            if r.spec.shadow is not None:
                await self.shadow.begin(r, now)
        elif any(e.status == "skipped" for e in r.nodes.values()) and r.spec.offline_wait_s > 0:
            r.state, r.phase_started_at = "waiting", now
            r.message = "waiting for offline nodes to return"
            await self.save(r, event="waiting_for_offline")
        else:
            await self.finish(r, "succeeded", now)

    async def finish(self, r: Rollout, state: str, now: float, **detail: Any) -> None:
        """End ``r`` in a terminal ``state`` (shadow labels removed first, best effort: a
        rollback retries until they are gone, an abort logs what is left)."""
        if r.spec.shadow is not None and not await self.shadow.clear(r):
            detail["shadow_labels_left"] = True
        r.state, r.finished_at, r.paused_from = state, now, None  # type: ignore[assignment]
        skipped = sorted(e.node for e in r.nodes.values() if e.status == "skipped")
        r.message = f"{len(skipped)} nodes were never upgraded (offline)" if skipped else ""
        await self.save(r, event=state, skipped=skipped[:50], **detail)

    async def _waiting(self, r: Rollout) -> None:
        now = self.parts.clock()
        back = self._returning(r, r.waves)
        if back:
            r.state = "applying"
            for e in back:
                e.wave = r.wave
            await self.save(r, back, event="node_returned", nodes=[e.node for e in back])
        elif now - r.phase_started_at >= r.spec.offline_wait_s:
            await self.finish(r, "succeeded", now)

    # ----------------------------------------------------------------------------- rollback
    async def rollback(self, r: Rollout, cause: dict[str, Any]) -> None:
        """Start rolling every touched node back, with ``cause`` recorded."""
        r.cause, r.state, r.paused_from = cause, "rolling_back", None
        r.message = "rolling back"
        await self.save(r, event="rollback_started", **cause)
        await self._rolling_back(r)

    async def _rolling_back(self, r: Rollout) -> None:
        key, version = self.label(r.spec.model), r.spec.version
        if r.spec.shadow is not None and not await self.shadow.clear(r):
            return  # retried next step: no shadow label outlives the rollout
        # nodes that only shadowed never had their model label touched: nothing to patch
        untouched = [e for e in r.nodes.values() if e.prev_recorded and e.applied_at is None
                     and e.status != "rolled_back"]
        for e in untouched:
            e.status = "rolled_back"
        if untouched:
            await self.save(r, untouched)
        todo = [e for e in r.nodes.values() if e.prev_recorded and e.status != "rolled_back"]
        if todo:
            results = await self.parts.cluster.patch_many(
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
            await self.save(r, done)
            if len(done) < len(todo):
                return
        await self.finish(r, "rolled_back", self.parts.clock())

    # ----------------------------------------------------------------------------- commands
    async def pause(self, r: Rollout, now: float, actor: str) -> None:
        """Stop stepping ``r`` where it is."""
        if r.state not in ("pending", "shadowing", "applying", "baking", "waiting"):
            raise Conflict(f"rollout {r.id} is {r.state}; only a running one can pause")
        r.paused_from, r.state = r.state, "paused"
        r.message = f"paused by {actor or 'api'}"
        await self.save(r, event="pause", by=actor)

    async def resume(self, r: Rollout, now: float, actor: str) -> None:
        """Back to where ``r`` was paused."""
        if r.state != "paused":
            raise Conflict(f"rollout {r.id} is {r.state}, not paused")
        await self.save(r, self._unpause(r, now), event="resume", by=actor)

    async def promote(self, r: Rollout, now: float, actor: str) -> None:
        """End the current bake now (a paused rollout is resumed first). Refused while the
        wave's nodes are still being switched: there is no bake to end yet."""
        if (r.paused_from if r.state == "paused" else r.state) in ("pending", "applying"):
            todo = [e for e in r.nodes.values()
                    if e.wave <= r.wave and e.status in ("planned", "applying")]
            if todo or r.state == "pending":
                raise Conflict(f"rollout {r.id} is still applying wave {r.wave + 1}/{r.waves} "
                               f"({len(todo)} nodes not active yet): promote ends a bake; "
                               "wait for the wave to bake (rollout status --watch)")
        entries = self._unpause(r, now) if r.state == "paused" else []
        if r.state == "shadowing":  # the operator accepts the candidate: switch this wave
            await self.save(r, entries, event="promoted", by=actor)
            await self._shadow_promoted(r)
        elif r.state in ("pending", "applying", "baking"):
            await self.save(r, entries, event="promoted", by=actor)
            await self.next_wave(r, now, promoted=True)
        elif r.state == "waiting":
            await self.save(r, entries)
            await self.finish(r, "succeeded", now, promoted=True)
        else:
            raise Conflict(f"rollout {r.id} is {r.state}; nothing to promote")

    async def _shadow_promoted(self, r: Rollout) -> None:
        if await self.shadow.promote(r):
            r.state, r.phase_started_at, r.message = "applying", self.parts.clock(), "applying"
            await self.save(r)

    async def abort(self, r: Rollout, now: float, actor: str) -> None:
        """Stop for good; nodes keep what they have."""
        if not r.active or r.state == "rolling_back":
            raise Conflict(f"rollout {r.id} is {r.state}; it cannot be aborted")
        r.cause = {"reason": "aborted", "by": actor}
        await self.finish(r, "aborted", now, by=actor)

    async def roll_back(self, r: Rollout, now: float, actor: str) -> None:
        """The operator's rollback (the controller made sure ``r`` may come back to life)."""
        await self.rollback(r, {"reason": "manual", "by": actor})

    def _unpause(self, r: Rollout, now: float) -> list[NodeEntry]:
        """Back to the paused state; the bake and the nodes' deadlines start again."""
        r.state, r.paused_from = r.paused_from or "applying", None  # type: ignore[assignment]
        r.phase_started_at, r.message = now, ""
        applying = [e for e in r.nodes.values() if e.status == "applying"]
        for e in applying:
            e.applied_at = now
        return applying
