"""Telemetry figures of one node or a group over a window, and how samples become them.

``Metrics`` is what the fleet hands out and what the rollout gates judge (``hub/rollouts/
gates.py``); it lives here, beside the samples it is computed from, so that the fleet depends on
nothing above it. ``aggregate`` turns one node's samples into figures, ``combine`` a group's
figures into one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Sample:
    """One telemetry message's figures for one model version."""

    t: float
    interval_s: float
    frames: int
    errors: int
    p50: float
    p95: float
    p99: float


@dataclass(frozen=True)
class Metrics:
    """Aggregated health of one node or group over a window (None: no frames to judge)."""

    frames: int
    errors: int
    fps: float
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    samples: int

    @property
    def error_rate(self) -> float | None:
        """errors / frames (1.0 when everything failed; None without any frames)."""
        total = self.frames + (self.errors if self.frames == 0 else 0)
        if total == 0:
            return None
        return min(1.0, self.errors / total)

    def get(self, metric: str) -> float | None:
        """The value of ``metric`` (None when the window holds nothing to judge it by)."""
        if metric == "error_rate":
            return self.error_rate
        if metric == "fps":
            return self.fps if self.samples else None
        value: float | None = getattr(self, metric)
        return value

    def as_dict(self) -> dict[str, float | int | None]:
        """Plain JSON form (API, database)."""
        return {
            "frames": self.frames, "errors": self.errors, "fps": round(self.fps, 3),
            "p50_ms": self.p50_ms, "p95_ms": self.p95_ms, "p99_ms": self.p99_ms,
            "error_rate": self.error_rate, "samples": self.samples,
        }


def aggregate(samples: Iterable[Sample]) -> Metrics:
    """Frame-weighted latency percentiles, summed counters, fps over the covered time.

    Percentiles of the union of windows cannot be recovered from per-window summaries; the
    frame-weighted mean of each window's percentile is the usual, documented approximation.
    """
    frames = errors = n = 0
    covered = 0.0
    w50 = w95 = w99 = 0.0
    for s in samples:
        n += 1
        frames += s.frames
        errors += s.errors
        covered += s.interval_s
        if s.frames > 0:
            w50 += s.p50 * s.frames
            w95 += s.p95 * s.frames
            w99 += s.p99 * s.frames
    fps = frames / covered if covered > 0 else 0.0
    if frames == 0:
        return Metrics(0, errors, fps, None, None, None, n)
    return Metrics(frames, errors, fps, w50 / frames, w95 / frames, w99 / frames, n)


def combine(per_node: Iterable[Metrics]) -> Metrics:
    """A group's figures: counters summed, latencies frame-weighted, fps averaged per node."""
    items = [m for m in per_node if m.samples > 0]
    if not items:
        return Metrics(0, 0, 0.0, None, None, None, 0)
    frames = sum(m.frames for m in items)
    errors = sum(m.errors for m in items)
    fps = sum(m.fps for m in items) / len(items)
    samples = sum(m.samples for m in items)
    if frames == 0:
        return Metrics(0, errors, fps, None, None, None, samples)

    def wavg(attr: str) -> float:
        return sum((getattr(m, attr) or 0.0) * m.frames for m in items) / frames

    return Metrics(frames, errors, fps, wavg("p50_ms"), wavg("p95_ms"), wavg("p99_ms"), samples)
