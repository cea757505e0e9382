"""The shadow phase of a wave: the candidate runs beside each node's version before the switch.

With ``spec.shadow``, every wave (the canary's too) starts in ``shadowing``. Its nodes get the
shadow label (``contract.protocol.shadow_label``, value: the candidate version) and keep their
model label, so the dispatcher (``hub/rollouts/desired.py``) sends them ``DesiredModel.shadow``:
the agent loads the candidate beside the active version, runs it on a sample of the same frames
and reports, per telemetry window, how often the two answers agree (``hub/fleet/shadow.py``).
The candidate never serves a result in this phase.

The phase judges the wave's shadowing nodes together, on the telemetry they sent since the
phase started:

* it **fails** when a node reports the shadow ``failed`` (after receiving the desired state that
  carried it), when the pooled agreement is below the gate once ``min_samples`` frames were
  compared (the point estimate decides; the Wilson interval is recorded beside it), or when
  ``timeout_s`` passes first; the cause records the gate, the agreement, its interval and the
  sample count, and the rollout rolls back (nodes never left their version);
* it **passes** when the wave compared at least ``min_samples`` frames, the agreement meets the
  gate, and every shadowing node reported at least one compared frame (so one node whose shadow
  silently compares nothing cannot hide behind the others). The shadow labels are then removed
  and the wave is applied and baked as usual.

Nodes are started in batches like an ordinary wave: an offline node is skipped (and upgraded
without a shadow phase if it returns after its wave passed, since the candidate already passed on
its wave's other nodes), and a node that runs no version of the model, or already the candidate,
has nothing to compare with: it waits and is switched with its wave once the phase passes. A
canary with no node to compare with fails the rollout at once rather than skip the check.

The fleet's shadow figures are in memory: after a hub restart a running phase counts again from
the telemetry that arrives (the timeout still counts from the phase's start, which is persisted).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import structlog

from edge_agent.contract.protocol import model_label, shadow_label
from hub.cluster.base import Cluster, LabelPreconditionFailed
from hub.errors import HubError
from hub.fleet import shadow as agreement
from hub.fleet.view import Fleet
from hub.rollouts.gates import parse_gate
from hub.rollouts.model import NodeEntry, Rollout, ShadowSpec

log = structlog.get_logger(__name__)

#: ``NodeEntry.error`` of a node that has nothing to compare the candidate with.
NOT_COMPARABLE = "no other version running to compare with: switched when the phase passes"
#: Nodes named in a cause or an event at most.
_NAMED = 20
#: Nodes handled between two yields to the event loop when judging a big wave.
_YIELD_EVERY = 250

Save = Callable[..., Awaitable[None]]


class Desired(Protocol):
    """What the phase asks the dispatcher: the generation that carried the shadow to a node."""

    def shadow_generation(self, node: str, model: str, version: str) -> int | None: ...


class ShadowPhase:
    """Runs the shadow phase of a rollout's current wave; the state machine calls it."""

    def __init__(self, *, cluster: Cluster, fleet: Fleet, desired: Desired,
                 clock: Callable[[], float], label_prefix: str, batch: int,
                 save: Save) -> None:
        self.cluster = cluster
        self.fleet = fleet
        self.desired = desired
        self.clock = clock
        self.label_prefix = label_prefix
        self.batch = batch
        self._save = save

    def key(self, model: str) -> str:
        """The node label that carries ``model``'s shadow candidate."""
        return shadow_label(model, self.label_prefix)

    async def begin(self, r: Rollout, now: float) -> None:
        """Enter the shadow phase of ``r``'s current wave."""
        spec = _spec(r)
        r.state, r.phase_started_at, r.message = "shadowing", now, "shadowing"
        r.shadow = {"wave": r.wave, "state": "running", "gate": spec.gate,
                    "min_samples": spec.min_samples, "timeout_s": spec.timeout_s,
                    "started_at": now, **agreement.ShadowFigures().as_dict(), "nodes": {}}
        await self._save(r, event="shadow_started", wave_index=r.wave, gate=spec.gate,
                         min_samples=spec.min_samples, timeout_s=spec.timeout_s)

    async def step(self, r: Rollout) -> dict[str, Any] | bool:
        """One move: True when the phase passed (labels removed, nodes planned again), a
        rollback cause when it failed, False while it runs."""
        spec, now, w = _spec(r), self.clock(), r.wave
        await self._start(r)
        shadowing = [e for e in r.nodes.values() if e.status == "shadowing"]
        await self._ensure_labels(r, shadowing)
        cause = await self._observe(r, shadowing)
        shadowing = [e for e in shadowing if e.status == "shadowing"]
        per_node: dict[str, agreement.ShadowFigures] = {}
        for i, e in enumerate(shadowing):
            if i % _YIELD_EVERY == _YIELD_EVERY - 1:
                await asyncio.sleep(0)  # thousands of nodes: let telemetry in between
            per_node[e.node] = self.fleet.shadow_figures(e.node, r.spec.model, r.spec.version,
                                                         since=r.phase_started_at)
        total = agreement.combine(per_node.values())
        self._record(r, spec, total, per_node)
        gate = parse_gate(spec.gate)
        figures = {"gate": spec.gate, **_figures(total), "min_samples": spec.min_samples,
                   "nodes": len(shadowing), "wave_index": w}
        if cause is None and total.samples >= spec.min_samples and total.agreement is not None \
                and not gate.holds(total.agreement):
            cause = {"reason": "shadow_gate", **figures}
        waiting = sorted(n for n, f in per_node.items() if f.samples == 0)
        planned = [e for e in r.nodes.values() if e.wave <= w and e.status == "planned"
                   and e.error != NOT_COMPARABLE]
        if cause is None and not shadowing and not planned:
            skipped = any(e.status == "skipped" and e.wave <= w for e in r.nodes.values())
            if not skipped and w == 0:
                cause = {"reason": "shadow_impossible", **figures,
                         "error": "no node of the canary runs a version to compare with"}
            elif not skipped:
                return await self._passed(r, total, note="no node of this wave to compare "
                                          "with; the candidate passed an earlier wave")
        if cause is None and now - r.phase_started_at > spec.timeout_s:
            cause = {"reason": "shadow_timeout", **figures, "limit": spec.timeout_s,
                     "waiting_for": waiting[:_NAMED]}
        if cause is not None:
            r.shadow = {**(r.shadow or {}), "state": "failed", "cause": cause}
            await self._save(r, event="shadow_failed", **cause)
            return cause
        if shadowing and not planned and not waiting and total.samples >= spec.min_samples:
            return await self._passed(r, total)
        r.message = (f"shadowing: {total.samples}/{spec.min_samples} frames compared"
                     + (f", {len(waiting)} nodes without any yet" if waiting else ""))
        return False

    # ------------------------------------------------------------------------------- nodes
    async def _start(self, r: Rollout) -> None:
        """Start the next batch of the wave's nodes (and offline ones that came back). Each
        node's version is recorded before its first label patch, as in an ordinary wave."""
        w, model_key = r.wave, model_label(r.spec.model, self.label_prefix)
        changed: list[NodeEntry] = []
        for e in r.nodes.values():
            if e.status == "skipped" and e.wave <= w and self.fleet.online(e.node):
                e.status, e.error = "planned", None
                changed.append(e)
        todo = [e for e in r.nodes.values() if e.status == "planned" and e.wave <= w
                and e.error != NOT_COMPARABLE]
        for e in todo[: self.batch]:
            node = self.cluster.get(e.node)
            if node is None:
                e.status, e.error = "gone", "no longer selected or deleted"
            elif not self.fleet.online(e.node):
                e.status, e.error = "skipped", "offline when its wave came"
            else:
                current = node.labels.get(model_key)
                if not e.prev_recorded:
                    e.prev_version, e.prev_recorded = current, True
                if current is None or current == r.spec.version:
                    e.error = NOT_COMPARABLE
                else:
                    e.status, e.generation = "shadowing", 0
            changed.append(e)
        if changed:
            await self._save(r, changed)

    async def _ensure_labels(self, r: Rollout, shadowing: list[NodeEntry]) -> None:
        """Label every shadowing node with the candidate (idempotent, like the model label)."""
        key, version = self.key(r.spec.model), r.spec.version
        todo = {e.node: {key: version} for e in shadowing
                if (n := self.cluster.get(e.node)) is not None and n.labels.get(key) != version}
        if not todo:
            return
        for name, res in (await self.cluster.patch_many(todo)).items():
            if isinstance(res, HubError):
                log.warning("rollout_shadow_patch_failed", rollout=r.id, node=name,
                            error=str(res))

    async def _observe(self, r: Rollout, shadowing: list[NodeEntry]) -> dict[str, Any] | None:
        """What the shadowing nodes report; the cause when one's shadow failed."""
        model, version = r.spec.model, r.spec.version
        changed: list[NodeEntry] = []
        cause: dict[str, Any] | None = None
        for e in shadowing:
            if e.generation == 0:
                gen = self.desired.shadow_generation(e.node, model, version)
                if gen is not None:
                    e.generation = gen
                    changed.append(e)
            st = self.fleet.model_state(e.node, model)
            if (e.generation and st is not None and st.shadow_version == version
                    and st.shadow_status == "failed"
                    and self.fleet.generation(e.node) >= e.generation):
                e.status, e.error = "failed", (st.shadow_error or "shadow failed")[:500]
                cause = {"reason": "shadow_failed", "node": e.node, "error": e.error,
                         "gate": _spec(r).gate, "wave_index": r.wave}
                changed.append(e)
                break
            if not self.fleet.online(e.node):
                e.status, e.error = "skipped", "went offline while shadowing"
                changed.append(e)
        if changed:
            await self._save(r, changed)
        return cause

    async def _passed(self, r: Rollout, total: agreement.ShadowFigures,
                      note: str = "") -> bool:
        """The phase passed: remove the shadow labels, then the wave's nodes are planned for
        the ordinary switch. False (retried next step) while a label could not be removed."""
        wave = [e for e in r.nodes.values() if e.wave <= r.wave]
        if not await self.clear(r, wave):
            r.message = "shadow passed; removing the shadow labels"
            return False
        changed = []
        for e in wave:
            if e.status == "shadowing" or (e.status == "planned" and e.error == NOT_COMPARABLE):
                e.status, e.generation, e.error = "planned", 0, None
                changed.append(e)
        r.shadow = {**(r.shadow or {}), "state": "passed", **total.as_dict()}
        detail: dict[str, Any] = {"wave_index": r.wave, "gate": _spec(r).gate, **_figures(total)}
        if note:
            detail["note"] = note
        await self._save(r, changed, event="shadow_passed", **detail)
        return True

    async def promote(self, r: Rollout) -> bool:
        """The operator accepts the candidate now: the phase passes on what it has."""
        total = agreement.combine(
            self.fleet.shadow_figures(e.node, r.spec.model, r.spec.version,
                                      since=r.phase_started_at)
            for e in r.nodes.values() if e.status == "shadowing")
        return await self._passed(r, total, note="promoted by the operator")

    async def clear(self, r: Rollout, entries: list[NodeEntry] | None = None) -> bool:
        """Remove the candidate's shadow label from the rollout's nodes that carry it (a
        compare-and-set: a label someone changed meanwhile is left alone). True when none is
        left; failed patches are logged and retried by the caller."""
        key, version = self.key(r.spec.model), r.spec.version
        names = [e.node for e in (entries if entries is not None else r.nodes.values())
                 if (node := self.cluster.get(e.node)) is not None
                 and node.labels.get(key) == version]
        if not names:
            return True
        results = await self.cluster.patch_many({n: {key: None} for n in names},
                                                expect={n: {key: version} for n in names})
        left = [n for n in names if isinstance(results.get(n), HubError)
                and not isinstance(results.get(n), LabelPreconditionFailed)]
        for n in left:
            log.warning("rollout_shadow_clear_failed", rollout=r.id, node=n,
                        error=str(results.get(n)))
        return not left

    # ----------------------------------------------------------------------------- figures
    def _record(self, r: Rollout, spec: ShadowSpec, total: agreement.ShadowFigures,
                per_node: dict[str, agreement.ShadowFigures]) -> None:
        """The phase's figures on the rollout (what ``rollout status`` shows)."""
        nodes: dict[str, Any] = {}
        for name, f in sorted(per_node.items()):
            st = self.fleet.model_state(name, r.spec.model)
            nodes[name] = {**_figures(f),
                           "status": st.shadow_status if st is not None and
                           st.shadow_version == r.spec.version else None}
        r.shadow = {**(r.shadow or {}), "wave": r.wave, "state": "running", "gate": spec.gate,
                    "min_samples": spec.min_samples, "timeout_s": spec.timeout_s,
                    "started_at": r.phase_started_at, **total.as_dict(), "nodes": nodes}


def _spec(r: Rollout) -> ShadowSpec:
    if r.spec.shadow is None:
        raise HubError(f"rollout {r.id} has no shadow phase")
    return r.spec.shadow


def _figures(f: agreement.ShadowFigures) -> dict[str, Any]:
    """The figures a cause or an event records."""
    d = f.as_dict()
    return {"agreement": d["agreement"], "ci_low": d["ci_low"], "ci_high": d["ci_high"],
            "samples": d["samples"]}
