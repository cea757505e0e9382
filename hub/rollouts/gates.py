"""Health gates: the conditions a wave's nodes must meet before a rollout moves on.

A gate is written ``metric op threshold``: ``p99_ms<=80`` (absolute), ``p99_ms<=1.5x`` (at most
1.5 times the baseline nodes), ``error_rate<=0.01``, ``fps>=0.9x`` (at least 90 % of the
baseline's fps). Latencies and the error rate are upper bounds, fps is a lower bound; the other
direction is refused because a gate that passes when things get worse is always a mistake.

Absolute gates are checked on every judged node (the worst node decides, and is named in the
cause); relative gates compare the frame-weighted aggregate of the nodes on the new version
against the baseline (nodes still on the previous version, or the snapshot taken when the
rollout started). A failed gate yields a ``Verdict`` with the metric, the observed value and the
threshold, which the rollout records as its cause.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from hub.errors import InvalidRequest
from hub.fleet.aggregate import Metrics

Metric = Literal["p50_ms", "p95_ms", "p99_ms", "error_rate", "fps"]

#: Which way each metric must go: "<=" means lower is better.
_DIRECTION: dict[str, Literal["<=", ">="]] = {
    "p50_ms": "<=",
    "p95_ms": "<=",
    "p99_ms": "<=",
    "error_rate": "<=",
    "fps": ">=",
}
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
    op: Literal["<=", ">="]
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
    if metric not in _DIRECTION:
        raise GateError(
            f"unknown gate metric {metric!r} in {text!r} (known: {', '.join(_DIRECTION)})"
        )
    op = m.group("op")
    want = _DIRECTION[metric]
    if op in ("<", ">"):
        op += "="  # strict and non-strict are the same thing on noisy aggregates
    if op != want:
        word = "an upper bound (<=)" if want == "<=" else "a lower bound (>=)"
        raise GateError(f"gate {text!r}: {metric} must be {word}")
    threshold = float(m.group("num"))
    relative = m.group("rel") is not None
    if relative and threshold <= 0:
        raise GateError(f"gate {text!r}: a baseline multiplier must be positive")
    if metric == "error_rate" and not relative and threshold > 1:
        raise GateError(f"gate {text!r}: error_rate is a fraction in [0, 1]")
    return Gate(metric, want, threshold, relative)  # type: ignore[arg-type]


def parse_gates(texts: list[str]) -> list[Gate]:
    """Parse every gate; refuse duplicates of the same metric and kind."""
    gates = [parse_gate(t) for t in texts]
    seen: set[tuple[str, bool]] = set()
    for g in gates:
        if (g.metric, g.relative) in seen:
            raise GateError(f"more than one {'relative' if g.relative else 'absolute'} gate "
                            f"on {g.metric}")
        seen.add((g.metric, g.relative))
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


def judge(
    gates: list[Gate],
    per_node: Mapping[str, Metrics],
    group: Metrics,
    baseline: Mapping[str, float | None],
) -> Verdict:
    """Check every gate; the first failure wins. ``ok=None`` when a value is missing."""
    for gate in gates:
        if gate.relative:
            base = baseline.get(gate.metric)
            value = group.get(gate.metric)
            if base is None or (base <= 0 and gate.op == "<="):
                return Verdict(None, str(gate), gate.metric, message="no baseline to compare with")
            if value is None:
                return Verdict(None, str(gate), gate.metric, message="no telemetry yet")
            if not gate.holds(value, base):
                return Verdict(False, str(gate), gate.metric, round(value, 4),
                               round(gate.limit(base) or 0.0, 4), None, round(base, 4),
                               message=f"{gate.metric}={value:.4g} breaks {gate} "
                                      f"(baseline {base:.4g})")
            continue
        worst: tuple[str, float] | None = None
        for node, m in sorted(per_node.items()):
            value = m.get(gate.metric)
            if value is None:
                return Verdict(None, str(gate), gate.metric, node=node, message="no telemetry yet")
            if worst is None or (value > worst[1] if gate.op == "<=" else value < worst[1]):
                worst = (node, value)
        if worst is not None and not gate.holds(worst[1]):
            return Verdict(False, str(gate), gate.metric, round(worst[1], 4), gate.threshold,
                           worst[0], message=f"{gate.metric}={worst[1]:.4g} on {worst[0]} "
                                            f"breaks {gate}")
    return Verdict(True)
