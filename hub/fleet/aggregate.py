"""Telemetry figures of one node or a group over a window, and how samples become them.

``Metrics`` is what the fleet hands out and what the rollout gates judge (``hub/rollouts/
gates.py``); it lives here, beside the samples it is computed from, so that the fleet depends on
nothing above it. ``aggregate`` turns one node's samples into figures, ``combine`` a group's
figures into one.

Everything that merges exactly is kept as ``Parts`` (counters, the latency and score
distributions of ``hub/fleet/sketches.py``, the class histogram) and every ``Metrics`` carries
the ``Parts`` it was read from, so ``combine`` merges distributions, never percentiles: the
group's p99 is the p99 of every frame of every node, within the sketch's 1 % relative error.
Samples of agents that send no sketch (older agents, during an upgrade) fall back to the
frame-weighted mean of their windows' percentiles; ``Metrics.exact`` says which one a figure is
(a mix weighs the exact percentile of the sketched frames and the mean of the rest by frames).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from hub.fleet.sketches import Dist, merge

#: Classes shown in ``Metrics.as_dict`` (the judged histogram keeps every label).
TOP_CLASSES = 10


@dataclass(frozen=True, slots=True)
class Outputs:
    """What one model version answered over one telemetry window (``OutputStats``)."""

    frames: int
    detections: int
    scores: Dist | None = None
    classes: Mapping[str, int] = field(default_factory=dict, hash=False)


@dataclass(frozen=True, slots=True)
class Sample:
    """One telemetry message's figures for one model version."""

    t: float
    interval_s: float
    frames: int
    errors: int
    p50: float
    p95: float
    p99: float
    #: The window's latencies as a mergeable distribution (None: an agent without sketches).
    latency: Dist | None = None
    outputs: Outputs | None = None


@dataclass(frozen=True)
class Parts:
    """The additive figures of a set of samples: what merges exactly across windows and nodes."""

    samples: int = 0
    frames: int = 0
    errors: int = 0
    covered_s: float = 0.0
    #: Frames of samples without a latency sketch, and sum(percentile * frames) over them.
    legacy_frames: int = 0
    legacy_sums: tuple[float, float, float] = (0.0, 0.0, 0.0)
    latency: Dist | None = None
    #: Latency frames that came with a sketch (the weight of ``latency`` beside the legacy part).
    sketched_frames: int = 0
    output_frames: int = 0
    detections: int = 0
    scores: Dist | None = None
    classes: Mapping[str, int] = field(default_factory=dict, hash=False)

    @classmethod
    def of(cls, s: Sample) -> Parts:
        """One sample's parts."""
        o = s.outputs
        sketched = s.latency is not None and s.latency.count > 0
        legacy = 0 if sketched or s.frames <= 0 else s.frames
        return cls(
            1, s.frames, s.errors, s.interval_s, legacy,
            (s.p50 * legacy, s.p95 * legacy, s.p99 * legacy),
            s.latency if sketched else None, s.frames if sketched else 0,
            o.frames if o else 0, o.detections if o else 0, o.scores if o else None,
            o.classes if o else {},
        )


def merge_parts(items: Iterable[Parts]) -> Parts:
    """The parts of the union: counters and sums added, distributions and histograms merged."""
    parts = list(items)
    if len(parts) == 1:
        return parts[0]
    classes: Counter[str] = Counter()
    for p in parts:
        if p.classes:
            classes.update(p.classes)
    return Parts(
        sum(p.samples for p in parts), sum(p.frames for p in parts),
        sum(p.errors for p in parts), sum(p.covered_s for p in parts),
        sum(p.legacy_frames for p in parts),
        (sum(p.legacy_sums[0] for p in parts), sum(p.legacy_sums[1] for p in parts),
         sum(p.legacy_sums[2] for p in parts)),
        merge([p.latency for p in parts]), sum(p.sketched_frames for p in parts),
        sum(p.output_frames for p in parts), sum(p.detections for p in parts),
        merge([p.scores for p in parts]), dict(classes),
    )


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
    #: True when every frame's latency came in a sketch: the percentiles are those of the union
    #: of frames (1 % relative error), not a mean of per-window percentiles.
    exact: bool = False
    #: Boxes per output frame (0 for classification); None without output statistics.
    detections_per_frame: float | None = None
    #: Median of every box's (or top-1) score, from the merged score distribution.
    score_p50: float | None = None
    #: Boxes per label (detection, faces) or frames per top-1 label (classification).
    classes: Mapping[str, int] = field(default_factory=dict, hash=False)
    #: What these figures were read from, so that ``combine`` merges exactly.
    parts: Parts | None = field(default=None, compare=False, repr=False, hash=False)

    @classmethod
    def from_parts(cls, p: Parts, fps: float | None = None) -> Metrics:
        """Figures of ``p``; fps over the covered time unless given."""
        if fps is None:
            fps = p.frames / p.covered_s if p.covered_s > 0 else 0.0
        dpf = p.detections / p.output_frames if p.output_frames else None
        score = p.scores.quantile(0.5) if p.scores is not None else None
        if p.frames == 0:
            return cls(0, p.errors, fps, None, None, None, p.samples, False, dpf, score,
                       p.classes, p)
        exact = p.legacy_frames == 0 and p.latency is not None
        if exact and p.latency is not None:
            q = p.latency.quantiles((0.5, 0.95, 0.99))
            return cls(p.frames, p.errors, fps, q[0], q[1], q[2], p.samples, True, dpf, score,
                       p.classes, p)
        weight = p.legacy_frames + p.sketched_frames
        if weight == 0:
            return cls(p.frames, p.errors, fps, None, None, None, p.samples, False, dpf, score,
                       p.classes, p)
        exact_q = (p.latency.quantiles((0.5, 0.95, 0.99)) if p.latency is not None
                   else [None, None, None])
        mixed = [((x or 0.0) * p.sketched_frames + s) / weight
                 for x, s in zip(exact_q, p.legacy_sums, strict=True)]
        return cls(p.frames, p.errors, fps, mixed[0], mixed[1], mixed[2], p.samples, False, dpf,
                   score, p.classes, p)

    @property
    def error_rate(self) -> float | None:
        """errors / frames (1.0 when everything failed; None without any frames)."""
        total = self.frames + (self.errors if self.frames == 0 else 0)
        if total == 0:
            return None
        return min(1.0, self.errors / total)

    def get(self, metric: str) -> float | None:
        """The value of ``metric`` (None when the window holds nothing to judge it by, or the
        metric is not a figure of one group: ``class_shift`` compares two, see gates)."""
        if metric == "error_rate":
            return self.error_rate
        if metric == "fps":
            return self.fps if self.samples else None
        value = getattr(self, metric, None)
        return value if isinstance(value, (int, float)) else None

    def own_parts(self) -> Parts:
        """``parts``, or for figures built by hand (tests, old callers) their legacy form."""
        if self.parts is not None:
            return self.parts
        lat = [self.p50_ms or 0.0, self.p95_ms or 0.0, self.p99_ms or 0.0]
        legacy = self.frames if self.p99_ms is not None else 0
        return Parts(self.samples, self.frames, self.errors, 0.0, legacy,
                     (lat[0] * legacy, lat[1] * legacy, lat[2] * legacy),
                     classes=self.classes)

    def as_dict(self) -> dict[str, object]:
        """Plain JSON form (API, database); the top classes only."""
        top = sorted(self.classes.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_CLASSES]
        return {
            "frames": self.frames, "errors": self.errors, "fps": round(self.fps, 3),
            "p50_ms": self.p50_ms, "p95_ms": self.p95_ms, "p99_ms": self.p99_ms,
            "error_rate": self.error_rate, "samples": self.samples, "exact": self.exact,
            "detections_per_frame": self.detections_per_frame, "score_p50": self.score_p50,
            "classes": dict(top),
        }


def aggregate(samples: Iterable[Sample]) -> Metrics:
    """Summed counters, fps over the covered time, latency percentiles of the merged sketches
    (the frame-weighted mean of window percentiles for samples without one)."""
    parts = [Parts.of(s) for s in samples]
    return Metrics.from_parts(merge_parts(parts) if parts else Parts())


def combine(per_node: Iterable[Metrics]) -> Metrics:
    """A group's figures: counters summed, distributions merged, fps averaged per node."""
    items = [m for m in per_node if m.samples > 0]
    if not items:
        return Metrics(0, 0, 0.0, None, None, None, 0)
    fps = sum(m.fps for m in items) / len(items)
    return Metrics.from_parts(merge_parts(m.own_parts() for m in items), fps)


def total_variation(p: Mapping[str, int], q: Mapping[str, int]) -> float | None:
    """0.5 * sum |p - q| over the normalised histograms, in [0, 1]: the share of answers whose
    label would have to change to turn one histogram into the other (None if either is empty)."""
    tp, tq = sum(p.values()), sum(q.values())
    if tp <= 0 or tq <= 0:
        return None
    labels = set(p) | set(q)
    return 0.5 * sum(abs(p.get(k, 0) / tp - q.get(k, 0) / tq) for k in labels)
