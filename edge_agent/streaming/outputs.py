"""What one model version did over a telemetry window: its latency and what it answered.

The relay (``streaming.pipeline``) feeds every published result into the ``Window`` of its
(model, version); the telemetry task takes the windows each interval and sends them as
``ModelTelemetry.latency`` (a mergeable ``contract.sketch.Sketch`` of end-to-end milliseconds)
and ``ModelTelemetry.outputs`` (``OutputStats``), which the hub merges across nodes and windows
for the rollout gates: exact-within-1 % fleet percentiles and output drift against the baseline.

A sketch, not a sample buffer: every latency of the window counts (a tail is never sampled
away) and memory is bounded by buckets (a few hundred at 1 % over 1 ms .. 10 s), not by frames.
The class histogram is kept per label up to ``MAX_LABELS`` (a model's label set is finite; a
model that invents labels cannot grow it further: the excess goes to ``OTHER_CLASS``), and is
cut to the ``MAX_CLASSES`` most frequent labels only when sent.

``Window.add`` runs on the event loop for every result, so it reads the result dict as the
post-processing built it (``contract.results``), with no validation and no allocation beyond
the counters: about 1.2 us for a classification and 6 us for a detection with ten boxes on the
2-core dev machine (``tests/agent/streaming/test_outputs.py`` measures and bounds it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from edge_agent.contract.protocol import MAX_CLASSES, OTHER_CLASS, LatencySummary, OutputStats
from edge_agent.contract.sketch import Sketch, SketchWire

#: Distinct labels one window counts before new ones go straight to ``OTHER_CLASS`` (bounds
#: memory against a model whose labels are not a small fixed set; ImageNet has 1,000).
MAX_LABELS = 4096


class Window:
    """One (model, version)'s results since the previous telemetry message (event loop only)."""

    __slots__ = ("classes", "detections", "frames", "latency", "out_frames", "scores")

    def __init__(self) -> None:
        #: Results published (each has an end-to-end latency in ``latency``).
        self.frames = 0
        #: End-to-end latencies, milliseconds.
        self.latency = Sketch()
        #: Results that carried an output (``detections`` or ``classes``).
        self.out_frames = 0
        #: Boxes over those results (detection and face tasks).
        self.detections = 0
        #: Every box's score, or each classification's top-1 score.
        self.scores = Sketch()
        #: Boxes per label, or results per top-1 label.
        self.classes: dict[str, int] = {}

    def add(self, e2e_ms: float, res: Mapping[str, Any]) -> None:
        """Count one result: its end-to-end latency (ms) and its output part."""
        self.frames += 1
        self.latency.add(e2e_ms)
        dets = res.get("detections")
        if dets is not None:
            self.out_frames += 1
            if not dets:
                return
            self.detections += len(dets)
            self._count(dets)
            return
        cls = res.get("classes")
        if cls is not None:
            self.out_frames += 1
            if cls:
                self._count(cls[:1])  # best first: the top-1 class and its score

    def _count(self, items: list[dict[str, Any]]) -> None:
        add = self.scores.add
        classes = self.classes
        get = classes.get
        for item in items:
            add(item["score"])
            label = item["label"]
            n = get(label)
            if n is not None:
                classes[label] = n + 1
            elif len(classes) < MAX_LABELS:
                classes[label] = 1
            else:  # a model that invents labels: bounded memory, still counted
                classes[OTHER_CLASS] = get(OTHER_CLASS, 0) + 1

    # ----------------------------------------------------------------------------- reading
    def latency_summary(self) -> LatencySummary:
        """p50/p95/p99 of the end-to-end latencies read from the sketch (within 1 %), ms."""
        q = self.latency.quantile
        if self.latency.count == 0:
            return LatencySummary()
        return LatencySummary(p50=round(q(0.50) or 0.0, 3), p95=round(q(0.95) or 0.0, 3),
                              p99=round(q(0.99) or 0.0, 3))

    def latency_wire(self) -> SketchWire | None:
        """The end-to-end latency sketch in its wire form (None when the window is empty)."""
        return self.latency.to_wire() if self.latency.count else None

    def output_stats(self) -> OutputStats | None:
        """The window's ``OutputStats`` (None when no result carried an output)."""
        if self.out_frames == 0:
            return None
        return OutputStats(frames=self.out_frames, detections=self.detections,
                           scores=self.scores.to_wire() if self.scores.count else None,
                           classes=cap_classes(self.classes))


def cap_classes(counts: Mapping[str, int], limit: int = MAX_CLASSES) -> dict[str, int]:
    """The ``limit`` most frequent labels (ties by label), the rest summed under ``OTHER_CLASS``.

    A label that already is ``OTHER_CLASS`` (labels past ``MAX_LABELS``) joins that sum, so the
    result has at most ``limit + 1`` keys and the same total as ``counts``.
    """
    other = counts.get(OTHER_CLASS, 0)
    ranked = sorted(((n, label) for label, n in counts.items() if label != OTHER_CLASS and n),
                    key=lambda t: (-t[0], t[1]))
    out = {label: n for n, label in ranked[:limit]}
    other += sum(n for n, _ in ranked[limit:])
    if other:
        out[OTHER_CLASS] = other
    return out
