"""Health gates: the conditions a wave's nodes must meet before a rollout moves on.

A gate is written ``metric op threshold``: ``p99_ms<=80`` (absolute), ``p99_ms<=1.5x`` (at most
1.5 times the baseline nodes), ``error_rate<=0.01``, ``fps>=0.9x`` (at least 90 % of the
baseline's fps). Latencies and the error rate are upper bounds, fps is a lower bound; the other
direction is refused because a gate that passes when things get worse is always a mistake.

Output-drift gates judge what the model answers, not how fast: ``detections_per_frame`` and
``score_p50`` take either direction (a broken model can find nothing or explode into boxes;
write ``detections_per_frame>=0.7x`` and ``detections_per_frame<=1.5x`` for a band), and
``class_shift<=0.15`` bounds the total variation distance between the wave's class histogram and
the baseline's (``class_shift``). ``agreement>=0.9`` is the shadow phase's gate (the share of
sampled frames on which the candidate agrees with the active version); it is judged by the
shadow phase from shadow telemetry, and ``judge`` skips it during an ordinary bake.

Absolute gates are checked on every judged node (the worst node decides, and is named in the
cause); relative gates compare the aggregate of the nodes on the new version against the
baseline (nodes still on the previous version, or the snapshot taken when the rollout started).
``class_shift`` is always judged on the wave as a whole: one camera's scene is not the fleet's.
A failed gate yields a ``Verdict`` with the metric, the observed value and the threshold, which
the rollout records as its cause.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from hub.errors import InvalidRequest
from hub.fleet.aggregate import Metrics, total_variation

Metric = Literal["p50_ms", "p95_ms", "p99_ms", "error_rate", "fps", "detections_per_frame",
                 "score_p50", "class_shift", "agreement"]
Op = Literal["<=", ">="]


@dataclass(frozen=True)
class _Rule:
    """What a metric allows: its directions, relative thresholds, a [0, 1] bound if absolute."""

    ops: tuple[Op, ...]
    relative: bool = True
    fraction: bool = False


#: Which way each metric may go: "<=" means lower is better. Output statistics allow both,
#: since a broken model can move them either way.
_RULES: dict[str, _Rule] = {
    "p50_ms": _Rule(("<=",)),
    "p95_ms": _Rule(("<=",)),
    "p99_ms": _Rule(("<=",)),
    "error_rate": _Rule(("<=",), fraction=True),
    "fps": _Rule((">=",)),
    "detections_per_frame": _Rule(("<=", ">=")),
    "score_p50": _Rule(("<=", ">="), fraction=True),
    "class_shift": _Rule(("<=",), relative=False, fraction=True),
    "agreement": _Rule((">=",), relative=False, fraction=True),
}
#: Gates judged by the shadow phase from shadow telemetry, not by ``judge`` during a bake.
SHADOW_METRICS = frozenset({"agreement"})
_GATE_RE = re.compile(
    r"^\s*(?P<metric>[a-z0-9_]+)\s*(?P<op><=|>=|<|>|==|=)\s*"
    r"(?P<num>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*"
    r"(?P<rel>x|×|\*\s*baseline|x\s*baseline)?\s*$"
)


class GateError(InvalidRequest, code="invalid_gate"):
    """A gate expression that cannot be used."""


@dataclass(frozen=True)
class Gate:
    """One parsed gate. ``relative`` gates multiply the baseline's value by ``threshold``."""

    metric: Metric
    op: Op
    threshold: float
    relative: bool = False

    def __str__(self) -> str:
        num = f"{self.threshold:g}"
        return f"{self.metric}{self.op}{num}{'x' if self.relative else ''}"

    def limit(self, baseline: float | None) -> float | None:
        """The concrete bound (None when relative and there is no baseline)."""
        if not self.relative:
            return self.threshold
        if baseline is None:
            return None
        return self.threshold * baseline

    def holds(self, value: float, baseline: float | None = None) -> bool | None:
        """Whether ``value`` satisfies the gate; None when it cannot be judged."""
        bound = self.limit(baseline)
        if bound is None:
            return None
        # a tiny tolerance so that 0.01 <= 0.01 survives float rounding of aggregated rates
        eps = 1e-9 * max(1.0, abs(bound))
        return value <= bound + eps if self.op == "<=" else value >= bound - eps


def parse_gate(text: str) -> Gate:
    """Parse one gate expression; raise GateError saying what is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise GateError("a gate must be a non-empty string like 'p99_ms<=80'")
    m = _GATE_RE.match(text)
    if m is None:
        raise GateError(
            f"cannot parse gate {text!r}: write METRIC<=NUMBER, METRIC>=NUMBER or "
            "METRIC<=Kx (K times the baseline), e.g. 'p99_ms<=80', 'fps>=0.9x'"
        )
    metric = m.group("metric")
    rule = _RULES.get(metric)
    if rule is None:
        raise GateError(
            f"unknown gate metric {metric!r} in {text!r} (known: {', '.join(_RULES)})"
        )
    op = m.group("op")
    if op in ("<", ">"):
        op += "="  # strict and non-strict are the same thing on noisy aggregates
    if op not in rule.ops:
        word = "an upper bound (<=)" if rule.ops == ("<=",) else "a lower bound (>=)"
        if len(rule.ops) > 1:
            word = "a bound (<= or >=)"
        raise GateError(f"gate {text!r}: {metric} must be {word}")
    threshold = float(m.group("num"))
    relative = m.group("rel") is not None
    if relative and not rule.relative:
        raise GateError(f"gate {text!r}: {metric} takes an absolute threshold only, "
                        f"not a multiple of the baseline")
    if relative and threshold <= 0:
        raise GateError(f"gate {text!r}: a baseline multiplier must be positive")
    if rule.fraction and not relative and threshold > 1:
        raise GateError(f"gate {text!r}: {metric} is a fraction in [0, 1]")
    return Gate(metric, op, threshold, relative)  # type: ignore[arg-type]


def parse_gates(texts: list[str]) -> list[Gate]:
    """Parse every gate; refuse duplicates of the same metric, direction and kind."""
    gates = [parse_gate(t) for t in texts]
    seen: set[tuple[str, str, bool]] = set()
    for g in gates:
        key = (g.metric, g.op, g.relative)
        if key in seen:
            raise GateError(f"more than one {'relative' if g.relative else 'absolute'} "
                            f"{g.op} gate on {g.metric}")
        seen.add(key)
    return gates


@dataclass(frozen=True)
class Verdict:
    """The outcome of judging a wave: ``ok`` True/False, or None when undecidable yet."""

    ok: bool | None
    gate: str | None = None
    metric: str | None = None
    value: float | None = None
    limit: float | None = None
    node: str | None = None
    baseline: float | None = None
    message: str = ""

    def as_cause(self) -> dict[str, object]:
        """The record stored as a rollout's cause."""
        return {k: v for k, v in self.__dict__.items() if v is not None and k != "ok"}


def baseline_value(baseline: Mapping[str, Any], metric: str) -> float | None:
    """A number of a baseline record (a snapshot read back from the database may hold
    anything: what is not a number counts as missing)."""
    value = baseline.get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def baseline_classes(baseline: Mapping[str, Any]) -> dict[str, int]:
    """The class histogram of a baseline record (empty when it has none: older rollouts)."""
    raw = baseline.get("classes")
    if not isinstance(raw, Mapping):
        return {}
    return {str(k): int(v) for k, v in raw.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0}


#: Answers (frames, or boxes) each histogram needs before ``class_shift`` can fail or pass.
#: Measured on the looping sample clip (bikes.mp4, EfficientNet-Lite0, 10 fps): windows of the
#: same model differ by a total variation of 0.46 (median) at 50 answers, 0.06 (p95 0.11) at
#: 100-1000 answers taken over whole loops, and up to 0.16 between a 13-s window of 3 nodes
#: (~400 answers, partial loops) and a 120-s snapshot; a real release error (channel order
#: swapped) moves it by 0.22-0.24. 600 answers is a minute of one 10-fps camera.
CLASS_SHIFT_MIN_ANSWERS = 600


def _class_shift(gate: Gate, group: Metrics, baseline: Mapping[str, Any]) -> Verdict | None:
    """``class_shift`` on the wave as a whole; None when it holds."""
    base = baseline_classes(baseline)
    if not base:
        return Verdict(None, str(gate), gate.metric, message="no baseline class histogram")
    have, base_have = sum(group.classes.values()), sum(base.values())
    if min(have, base_have) < CLASS_SHIFT_MIN_ANSWERS:
        return Verdict(None, str(gate), gate.metric,
                       message=f"class_shift waits for {CLASS_SHIFT_MIN_ANSWERS} answers on each "
                               f"side (wave {have}, baseline {base_have})")
    value = total_variation(group.classes, base)
    if value is None:
        return Verdict(None, str(gate), gate.metric, message="no output statistics yet")
    if gate.holds(value):
        return None
    return Verdict(False, str(gate), gate.metric, round(value, 4), gate.threshold,
                   message=f"class_shift={value:.4g} breaks {gate} (total variation distance "
                           f"from the baseline's class histogram)")


def _relative(gate: Gate, group: Metrics, baseline: Mapping[str, Any]) -> Verdict | None:
    """A gate against the baseline's figure; None when it holds."""
    base = baseline_value(baseline, gate.metric)
    value = group.get(gate.metric)
    if base is None or (base <= 0 and gate.op == "<="):
        return Verdict(None, str(gate), gate.metric, message="no baseline to compare with")
    if value is None:
        return Verdict(None, str(gate), gate.metric, message="no telemetry yet")
    if gate.holds(value, base):
        return None
    return Verdict(False, str(gate), gate.metric, round(value, 4),
                   round(gate.limit(base) or 0.0, 4), None, round(base, 4),
                   message=f"{gate.metric}={value:.4g} breaks {gate} (baseline {base:.4g})")


def _absolute(gate: Gate, per_node: Mapping[str, Metrics]) -> Verdict | None:
    """A gate on every node (the worst decides); None when it holds."""
    worst: tuple[str, float] | None = None
    for node, m in sorted(per_node.items()):
        value = m.get(gate.metric)
        if value is None:
            return Verdict(None, str(gate), gate.metric, node=node, message="no telemetry yet")
        if worst is None or (value > worst[1] if gate.op == "<=" else value < worst[1]):
            worst = (node, value)
    if worst is None or gate.holds(worst[1]):
        return None
    return Verdict(False, str(gate), gate.metric, round(worst[1], 4), gate.threshold, worst[0],
                   message=f"{gate.metric}={worst[1]:.4g} on {worst[0]} breaks {gate}")


def judge(
    gates: list[Gate],
    per_node: Mapping[str, Metrics],
    group: Metrics,
    baseline: Mapping[str, Any],
) -> Verdict:
    """Check every gate; the first failure wins. ``ok=None`` when a value is missing.

    ``baseline`` holds the baseline's figures by metric name and, for ``class_shift``, its
    class histogram under ``"classes"``. Gates of ``SHADOW_METRICS`` are skipped: the shadow
    phase judges them from shadow telemetry, a bake has nothing to judge them by.
    """
    for gate in gates:
        if gate.metric in SHADOW_METRICS:
            continue
        if gate.metric == "class_shift":
            verdict = _class_shift(gate, group, baseline)
        elif gate.relative:
            verdict = _relative(gate, group, baseline)
        else:
            verdict = _absolute(gate, per_node)
        if verdict is not None:
            return verdict
    return Verdict(True)
