"""What a rollout is: its spec (validated), its plan (which nodes in which wave), its state.

Kept apart from the controller and the state machine (``hub/rollouts/controller.py``,
``hub/rollouts/machine.py``) and the database (``hub/rollouts/store.py``), so the API can
validate a request and print a dry-run plan with no side effect at all.

States::

    pending -> applying(wave i) -> baking(wave i) -> applying(wave i+1) ... -> succeeded
                                                                        \\-> waiting -> succeeded
    with a shadow phase, each wave starts in shadowing(wave i) -> applying(wave i) -> ...
    any active state -> paused -> (resume) the state it was paused in
    any active state -> rolling_back -> rolled_back        (a gate, a failed node, a deadline)
    any active state -> aborted                             (stop; nodes keep what they have)

``waiting`` means every wave passed but nodes that were offline when their wave came have not
returned yet; they are upgraded and judged when they do, for up to ``offline_wait_s``.
``shadowing`` (only with ``spec.shadow``) runs the candidate beside each node's current version
and compares their answers before the wave is switched (``hub/rollouts/shadowing.py``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edge_agent.contract import protocol
from hub.cluster.selectors import parse_selector
from hub.errors import InvalidRequest
from hub.rollouts.gates import SHADOW_METRICS, parse_gate, parse_gates

State = Literal["pending", "shadowing", "applying", "baking", "waiting", "paused",
                "rolling_back", "succeeded", "aborted", "rolled_back"]
ACTIVE_STATES: frozenset[str] = frozenset(
    {"pending", "shadowing", "applying", "baking", "waiting", "paused", "rolling_back"}
)
TERMINAL_STATES: frozenset[str] = frozenset({"succeeded", "aborted", "rolled_back"})

NodeStatus = Literal["planned", "shadowing", "skipped", "applying", "active", "failed",
                     "rolled_back", "gone"]


class ShadowSpec(BaseModel):
    """A shadow phase at the start of every wave (the canary's too): the wave's nodes load the
    candidate beside the version they serve, run it on a sample of the same frames and report
    how often the two agree; the wave is switched only when the phase passes."""

    model_config = ConfigDict(extra="forbid")

    #: The gate on the pooled agreement of the wave's nodes (``agreement>=K``, K in [0, 1]).
    gate: str = "agreement>=0.9"
    #: Compared frames the wave's nodes must report together before the gate is judged.
    #: Default 200: the 95 % interval of an agreement near 0.9 is then about +-0.04.
    min_samples: int = Field(200, ge=1, le=10_000_000)
    #: How long the phase may take to collect ``min_samples`` and pass, seconds.
    timeout_s: float = Field(600.0, gt=0, le=7 * 86400)

    @field_validator("gate")
    @classmethod
    def _gate(cls, v: str) -> str:
        gate = parse_gate(v)
        if gate.metric not in SHADOW_METRICS:
            raise ValueError(f"the shadow phase's gate judges agreement, e.g. "
                             f"'agreement>=0.9' (got {v!r})")
        return str(gate)


class RolloutSpec(BaseModel):
    """A rollout request. Percentages are of the selected nodes; waves are cumulative."""

    model_config = ConfigDict(extra="forbid")

    model: protocol.Name
    version: protocol.Version
    #: Kubernetes label selector; empty selects every camera node.
    selector: str = ""
    #: Canary size as a node count (0: no canary wave).
    canary: int | None = Field(1, ge=0)
    #: Canary size as a percentage of the selected nodes (wins over ``canary``).
    canary_percent: float | None = Field(None, gt=0, le=100)
    #: Cumulative percentages after the canary; the last must be 100.
    waves: list[float] = Field(default_factory=lambda: [25.0, 50.0, 100.0])
    #: How long each wave runs on the new version before it is judged, seconds.
    bake_s: float = Field(300.0, ge=0)
    gates: list[str] = Field(default_factory=list)
    #: How long a node may take to report the new version active, seconds.
    deadline_s: float = Field(600.0, gt=0)
    #: After the last wave, how long to wait for skipped (offline) nodes to return, seconds.
    offline_wait_s: float = Field(3600.0, ge=0)
    #: Telemetry messages each judged node must send during a bake before gates can pass.
    min_samples: int = Field(2, ge=1, le=1000)
    #: A shadow phase before each wave is switched (None: switch at once).
    shadow: ShadowSpec | None = None

    @field_validator("selector")
    @classmethod
    def _selector(cls, v: str) -> str:
        return str(parse_selector(v))

    @field_validator("gates")
    @classmethod
    def _gates(cls, v: list[str]) -> list[str]:
        gates = parse_gates(v)
        if any(g.metric in SHADOW_METRICS for g in gates):
            raise ValueError("agreement is judged by a shadow phase: give it as shadow.gate "
                             "(edge-hub rollout start --shadow --shadow-gate 'agreement>=0.9')")
        return [str(g) for g in gates]

    @field_validator("waves")
    @classmethod
    def _waves(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("at least one wave is needed (the last must be 100)")
        if any(not 0 < p <= 100 for p in v):
            raise ValueError("wave percentages must be in (0, 100]")
        if any(b <= a for a, b in itertools.pairwise(v)):
            raise ValueError("wave percentages must increase")
        if v[-1] != 100:
            raise ValueError("the last wave must be 100 (every selected node)")
        return v

    @model_validator(mode="after")
    def _canary(self) -> RolloutSpec:
        if self.canary_percent is not None:
            self.canary = None
        elif self.canary is None:
            self.canary = 0
        return self


def parse_spec(data: Any) -> RolloutSpec:
    """Validate a request body; raise InvalidRequest naming the field.

    Selector and gate errors are not ValueErrors, so pydantic lets them through unchanged
    with their own codes (``invalid_selector``, ``invalid_gate``).
    """
    if not isinstance(data, dict):
        raise InvalidRequest("a rollout must be a JSON object")
    try:
        return RolloutSpec.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(body)"
        msg = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
        raise InvalidRequest(f"{where}: {msg}") from exc


def plan_waves(spec: RolloutSpec, nodes: list[str]) -> list[list[str]]:
    """Split ``nodes`` (in rollout order) into the canary and the cumulative waves.

    Empty waves are dropped (25 % of four nodes is the canary already).
    """
    total = len(nodes)
    if spec.canary_percent is not None:
        canary = max(1, math.ceil(total * spec.canary_percent / 100))
    else:
        canary = spec.canary or 0
    canary = min(canary, total)
    waves: list[list[str]] = []
    if canary:
        waves.append(nodes[:canary])
    done = canary
    for pct in spec.waves:
        upto = max(done, min(total, math.ceil(total * pct / 100 - 1e-9)))
        if upto > done:
            waves.append(nodes[done:upto])
            done = upto
    return waves


@dataclass
class NodeEntry:
    """One target node's part in a rollout (persisted in ``rollout_nodes``)."""

    node: str
    wave: int
    status: NodeStatus = "planned"
    #: The version the node had before (None: the model was not assigned). Recorded once,
    #: before the first label patch, and never overwritten (a restart must not lose it).
    prev_version: str | None = None
    prev_recorded: bool = False
    #: The first desired generation that carried the new version to this node.
    generation: int = 0
    applied_at: float | None = None
    active_at: float | None = None
    error: str | None = None


@dataclass
class Rollout:
    """A rollout with its live state (persisted in ``rollouts``)."""

    id: int
    spec: RolloutSpec
    state: State = "pending"
    wave: int = 0
    waves: int = 0
    paused_from: str | None = None
    phase_started_at: float = 0.0
    #: Figures by metric name, and the class histogram under "classes" (machine.snapshot).
    baseline: dict[str, Any] = field(default_factory=dict)
    cause: dict[str, Any] | None = None
    message: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0
    finished_at: float | None = None
    created_by: str = ""
    nodes: dict[str, NodeEntry] = field(default_factory=dict)
    #: The shadow phase's latest figures (``hub/rollouts/shadowing.py``: wave, gate, pooled
    #: agreement with its interval, samples, per node); None before any shadow phase.
    shadow: dict[str, Any] | None = None

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    def wave_nodes(self, i: int) -> list[NodeEntry]:
        return [e for e in self.nodes.values() if e.wave == i]

    def summary(self) -> dict[str, Any]:
        """The rollout without per-node detail (lists)."""
        counts: dict[str, int] = {}
        for e in self.nodes.values():
            counts[e.status] = counts.get(e.status, 0) + 1
        return {
            "id": self.id, "model": self.spec.model, "version": self.spec.version,
            "selector": self.spec.selector, "state": self.state, "wave": self.wave,
            "waves": self.waves, "paused_from": self.paused_from,
            "phase_started_at": self.phase_started_at, "cause": self.cause,
            "message": self.message, "created_at": self.created_at,
            "updated_at": self.updated_at, "finished_at": self.finished_at,
            "created_by": self.created_by, "nodes_total": len(self.nodes),
            "node_counts": counts,
        }

    def as_dict(self) -> dict[str, Any]:
        """Everything, for ``GET /v1/rollouts/{id}``."""
        out = self.summary()
        out["spec"] = self.spec.model_dump()
        out["baseline"] = self.baseline
        out["shadow"] = self.shadow
        out["plan"] = [[e.node for e in sorted(self.wave_nodes(i), key=lambda e: e.node)]
                       for i in range(self.waves)]
        out["nodes"] = [dataclasses.asdict(e) for e in sorted(self.nodes.values(),
                                                              key=lambda e: (e.wave, e.node))]
        return out
