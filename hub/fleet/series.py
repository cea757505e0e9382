"""One node's samples of one model version over the window, and the merges asked of them.

A rollout tick asks for every judged node's figures since the bake started, and for every
baseline node's since the same instant: thousands of queries a second, while each node adds a
sample once per telemetry interval. Merging a node's whole window again for each query would
cost (nodes x samples per window) sketch merges per tick; a ``Series`` instead remembers, for
the last few start points it was asked about, the ``Parts`` it merged and up to which sample,
and merges only what arrived since (merging is associative, so the result is the same).
Memory stays what the samples take: one dense latency and score distribution per message (a
few hundred bytes each, see ``bench/fleet.py``) and a handful of cached merges per series.
"""

from __future__ import annotations

from collections import deque

from edge_agent.contract.protocol import ModelTelemetry
from hub.fleet import aggregate as figures
from hub.fleet.sketches import Dist, SketchRejected

#: Start points a series remembers merges for (a bake's start, the baseline's, the API's).
_MEMO = 4
#: Longest class label kept (labels come from model manifests; longer ones are cut).
_LABEL_MAX = 100


def sample_of(now: float, interval_s: float, m: ModelTelemetry
              ) -> tuple[figures.Sample, list[str]]:
    """The sample a telemetry entry makes, and the reasons of parts dropped from it.

    A sketch the hub cannot merge is dropped (the window's percentiles still count); output
    statistics with a bad histogram or score sketch are dropped whole (counted, not judged).
    """
    dropped: list[str] = []
    latency: Dist | None = None
    if m.latency is not None:
        try:
            latency = Dist.from_wire(m.latency)
        except SketchRejected:
            dropped.append("latency_sketch")
    outputs: figures.Outputs | None = None
    o = m.outputs
    if o is not None:
        try:
            scores = Dist.from_wire(o.scores) if o.scores is not None else None
            if any(c < 0 for c in o.classes.values()):
                raise SketchRejected("negative class count")
            classes = {k[:_LABEL_MAX]: c for k, c in o.classes.items() if c}
            outputs = figures.Outputs(o.frames, o.detections, scores, classes)
        except SketchRejected:
            dropped.append("output_stats")
    lat = m.latency_ms
    return (figures.Sample(now, interval_s, m.frames, m.errors, lat.p50, lat.p95, lat.p99,
                           latency, outputs), dropped)


class Series:
    """A node's samples of one (model, version) in arrival order, with remembered merges."""

    __slots__ = ("_memo", "_seq", "samples")

    def __init__(self) -> None:
        self.samples: deque[figures.Sample] = deque()
        #: Samples ever appended: sample ``samples[i]`` has sequence ``_seq - len + i``.
        self._seq = 0
        #: first sequence -> (sequence after the last merged sample, parts, figures or None)
        self._memo: dict[int, tuple[int, figures.Parts, figures.Metrics | None]] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def append(self, sample: figures.Sample, horizon: float) -> None:
        """Add a sample and drop those older than ``horizon``."""
        self.samples.append(sample)
        self._seq += 1
        self.evict(horizon)

    def evict(self, horizon: float) -> None:
        """Drop samples older than ``horizon`` (and the merges that started on them)."""
        dq = self.samples
        dropped = False
        while dq and dq[0].t < horizon:
            dq.popleft()
            dropped = True
        if dropped and self._memo:
            first = self._seq - len(dq)
            self._memo = {k: v for k, v in self._memo.items() if k >= first}

    def _first_index(self, start: float) -> int:
        for i, s in enumerate(self.samples):
            if s.t >= start:
                return i
        return len(self.samples)

    def _merged(self, start: float) -> tuple[int, figures.Parts, figures.Metrics | None]:
        i = self._first_index(start)
        base = self._seq - len(self.samples)
        key = base + i
        hit = self._memo.get(key)
        if hit is not None and hit[0] == self._seq:
            return hit
        if hit is not None:
            done, parts, _ = hit
            new = [figures.Parts.of(self.samples[j - base]) for j in range(done, self._seq)]
            parts = figures.merge_parts([parts, *new])
        else:
            chosen = [figures.Parts.of(self.samples[j]) for j in range(i, len(self.samples))]
            parts = figures.merge_parts(chosen) if chosen else figures.Parts()
        if len(self._memo) >= _MEMO and key not in self._memo:
            self._memo.pop(next(iter(self._memo)))
        entry = (self._seq, parts, None)
        self._memo[key] = entry
        return entry

    def parts(self, start: float) -> figures.Parts:
        """The merged parts of the samples at or after ``start``."""
        return self._merged(start)[1]

    def metrics(self, start: float) -> figures.Metrics:
        """The figures of the samples at or after ``start`` (read once per new sample)."""
        i = self._first_index(start)
        key = self._seq - len(self.samples) + i
        seq, parts, m = self._merged(start)
        if m is None:
            m = figures.Metrics.from_parts(parts)
            self._memo[key] = (seq, parts, m)
        return m
