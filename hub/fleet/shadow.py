"""Shadow agreement: what nodes report about a candidate running beside their active version.

An agent with a shadow candidate adds ``ModelTelemetry.shadow`` to each telemetry message: per
window, the frames compared (``samples``), the sum of their per-frame agreements in [0, 1]
(``agreement_sum``), the frames the candidate failed on or skipped, and the busy time of both
versions. ``ShadowLog`` keeps those windows per node and (model, candidate version), stamped with
the hub's clock at receipt, and ``ShadowFigures`` sums any of them: across windows and across
nodes the sums simply add, so the pooled agreement is ``sum(agreement_sum) / sum(samples)``,
exact, with no approximation to state.

``ShadowFigures.interval`` is the Wilson score interval at 95 %. For classification each frame's
agreement is 0 or 1 and this is the textbook interval of a proportion; for detection each frame
scores an F1 in [0, 1], whose variance is at most p(1 - p), so the same interval is a
conservative one. Consecutive frames of one camera are not independent (a scene that fools both
versions fools them for many frames), so the interval is a guide for the operator, not a proof;
the gate judges the point estimate once ``min_samples`` frames were compared.

Windows are kept for ``KEEP_S`` (longer than the telemetry window: a shadow phase may last as
long as its timeout), at most ``KEEP_WINDOWS`` per key and ``KEEP_VERSIONS`` candidates per node
and model, so a node that never stops shadowing cannot grow the hub's memory.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from edge_agent.contract.telemetry import ShadowTelemetry

#: How long a shadow window is kept, seconds (the longest sensible shadow phase).
KEEP_S = 24 * 3600.0
#: Windows kept per (node, model, candidate version): a day of 10 s telemetry.
KEEP_WINDOWS = 8640
#: Candidate versions kept per (node, model): a node cannot grow the hub's memory by sending
#: many version strings; the one least recently heard of goes first.
KEEP_VERSIONS = 4
#: z for a two-sided 95 % interval.
_Z95 = 1.959963984540054


def wilson(successes: float, n: int, z: float = _Z95) -> tuple[float, float] | None:
    """The Wilson score interval of ``successes`` out of ``n`` (None when ``n`` is 0)."""
    if n <= 0:
        return None
    p = min(1.0, max(0.0, successes / n))
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class ShadowFigures:
    """Summed shadow telemetry of one node or a group over some windows."""

    samples: int = 0
    agreement_sum: float = 0.0
    errors: int = 0
    skipped: int = 0
    busy_s: float = 0.0
    active_busy_s: float = 0.0
    #: Telemetry messages that carried shadow figures.
    messages: int = 0

    @property
    def agreement(self) -> float | None:
        """Pooled agreement (None before any compared frame)."""
        if self.samples <= 0:
            return None
        return min(1.0, self.agreement_sum / self.samples)

    def interval(self) -> tuple[float, float] | None:
        """Wilson 95 % interval of the agreement (see the module docstring)."""
        return wilson(self.agreement_sum, self.samples)

    def __add__(self, other: ShadowFigures) -> ShadowFigures:
        return ShadowFigures(
            self.samples + other.samples, self.agreement_sum + other.agreement_sum,
            self.errors + other.errors, self.skipped + other.skipped,
            self.busy_s + other.busy_s, self.active_busy_s + other.active_busy_s,
            self.messages + other.messages,
        )

    def as_dict(self) -> dict[str, float | int | None]:
        """Plain JSON form (API, rollout record, cause)."""
        ci = self.interval()
        agreement = self.agreement
        return {
            "samples": self.samples,
            "agreement": round(agreement, 4) if agreement is not None else None,
            "ci_low": round(ci[0], 4) if ci else None,
            "ci_high": round(ci[1], 4) if ci else None,
            "errors": self.errors, "skipped": self.skipped,
            "busy_s": round(self.busy_s, 3), "active_busy_s": round(self.active_busy_s, 3),
        }


def of_message(t: ShadowTelemetry) -> ShadowFigures:
    """One telemetry window's figures."""
    return ShadowFigures(t.samples, t.agreement_sum, t.errors, t.skipped, t.busy_s,
                         t.active_busy_s, 1)


def combine(items: Iterable[ShadowFigures]) -> ShadowFigures:
    """The sum of several nodes' or windows' figures."""
    total = ShadowFigures()
    for f in items:
        total = total + f
    return total


@dataclass
class ShadowLog:
    """Shadow windows of every node, by (node, model) and candidate version, hub time."""

    windows: dict[tuple[str, str], dict[str, deque[tuple[float, ShadowFigures]]]] = field(
        default_factory=dict)

    def add(self, node: str, model: str, t: ShadowTelemetry, now: float) -> None:
        """One window of ``node``'s shadow of ``model`` (version ``t.version``)."""
        versions = self.windows.setdefault((node, model), {})
        dq = versions.get(t.version)
        if dq is None:
            if len(versions) >= KEEP_VERSIONS:
                del versions[min(versions, key=lambda v: versions[v][-1][0]
                                 if versions[v] else 0.0)]
            dq = versions[t.version] = deque(maxlen=KEEP_WINDOWS)
        dq.append((now, of_message(t)))
        while dq and dq[0][0] < now - KEEP_S:
            dq.popleft()

    def figures(self, node: str, model: str, version: str,
                since: float | None = None) -> ShadowFigures:
        """The node's figures for candidate ``version`` of ``model`` (windows from ``since``)."""
        dq = self.windows.get((node, model), {}).get(version)
        if not dq:
            return ShadowFigures()
        return combine(f for ts, f in dq if since is None or ts >= since)
