"""Latency and score distributions as the hub keeps and merges them: the contract's sketch, dense.

Agents send ``contract.sketch.SketchWire`` (DDSketch's log mapping at 1 % relative accuracy).
The hub merges thousands of them per rollout tick (every judged node's window, then the wave,
then the baseline nodes), so it keeps each one as ``Dist``: the first bucket key and a numpy
array of counts. Merging is adding arrays at their offsets, exactly as the contract's
``Sketch.merge`` adds its buckets; a quantile is read with the same rank convention and bucket
value as ``Sketch.quantile``, so the hub's p99 of a merged set is the p99 of the union of every
sample, within the sketch's relative accuracy (tests/hub/fleet check both against raw samples).

A ``Dist`` is never changed after it is built: merges make new ones, so a figure handed to the
API or cached per node cannot be altered by a later merge. One window's counts are stored in the
narrowest unsigned type that holds them (a 10 s window rarely needs more than a byte a bucket):
the fleet keeps one latency and one score distribution per message for the whole window, for
thousands of nodes, and int64 buckets made that a third of a gigabyte at 5,000 nodes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.contract.sketch import (
    DEFAULT_ACCURACY,
    MAX_BINS,
    Sketch,
    SketchWire,
    bucket_value,
    gamma_of,
)

Counts = npt.NDArray[np.integer[Any]]


class SketchRejected(ValueError):
    """A sketch the hub cannot merge (another accuracy, negative counts); the sample's
    percentiles are used instead and the drop is counted."""


class Dist:
    """An immutable dense log-bucketed histogram (bucket ``offset + i`` holds ``counts[i]``)."""

    __slots__ = ("count", "counts", "offset", "zeros")

    #: Every hub-side distribution uses the contract's accuracy: only equal ones merge.
    accuracy = DEFAULT_ACCURACY
    gamma = gamma_of(DEFAULT_ACCURACY)

    def __init__(self, offset: int, counts: Counts, zeros: int = 0) -> None:
        self.offset = offset
        self.counts = counts
        self.zeros = zeros
        self.count = int(zeros + int(counts.sum(dtype=np.int64)))

    @classmethod
    def from_wire(cls, wire: SketchWire) -> Dist:
        """The wire form as a ``Dist``; ``SketchRejected`` when it cannot be merged."""
        if not math.isclose(wire.a, DEFAULT_ACCURACY, rel_tol=1e-9):
            raise SketchRejected(f"sketch accuracy {wire.a} (the hub merges {DEFAULT_ACCURACY})")
        counts = np.asarray(wire.c, dtype=np.int64)
        if counts.size and int(counts.min()) < 0:
            raise SketchRejected("negative sketch counts")
        nz = np.flatnonzero(counts)
        if nz.size == 0:
            return cls(0, np.zeros(0, dtype=np.int64), wire.z)
        first, last = int(nz[0]), int(nz[-1])
        kept = counts[first:last + 1]
        return cls(wire.o + first, kept.astype(_narrowest(int(kept.max()))), wire.z)

    @classmethod
    def from_values(cls, values: Sequence[float]) -> Dist:
        """The distribution of raw ``values`` (tests, the bench's simulator)."""
        s = Sketch(DEFAULT_ACCURACY)
        s.extend(values)
        return cls.from_wire(s.to_wire())

    # ------------------------------------------------------------------------------ reading
    def value(self, key: int) -> float:
        """The value bucket ``key`` stands for (as ``contract.sketch.Sketch.value``)."""
        return bucket_value(key, self.gamma)

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile within 1 % relative error (rank ``floor(q * (count - 1))``, as
        the contract's ``Sketch.quantile``); None when empty."""
        if not 0 <= q <= 1:
            raise ValueError(f"quantile must be in [0, 1], got {q!r}")
        return self.quantiles([q])[0]

    def quantiles(self, qs: Sequence[float]) -> list[float | None]:
        """Several quantiles with one pass over the buckets."""
        if self.count == 0:
            return [None for _ in qs]
        cum = np.cumsum(self.counts, dtype=np.int64)
        out: list[float | None] = []
        for q in qs:
            rank = math.floor(q * (self.count - 1))
            if rank < self.zeros:
                out.append(0.0)
                continue
            i = int(np.searchsorted(cum, rank - self.zeros, side="right"))
            out.append(self.value(self.offset + min(i, len(cum) - 1)))
        return out

    def to_wire(self) -> SketchWire:
        """The contract's wire form of this distribution."""
        return SketchWire(a=self.accuracy, o=self.offset, c=self.counts.tolist(), z=self.zeros)

    def __repr__(self) -> str:
        return f"Dist(count={self.count}, buckets={self.counts.size}, offset={self.offset})"


def _narrowest(top: int) -> type[np.integer[Any]]:
    for kind in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(kind).max:
            return kind
    return np.int64


def merge(items: Sequence[Dist | None]) -> Dist | None:
    """The exact merge of every distribution in ``items`` (None when there is none).

    Counts add at their keys. Past ``MAX_BINS`` buckets the lowest collapse into one, as the
    contract's ``Sketch.to_wire`` does: only the lowest quantiles lose accuracy, never the tail.
    """
    dists = [d for d in items if d is not None]
    if not dists:
        return None
    if len(dists) == 1:
        return dists[0]
    zeros = sum(d.zeros for d in dists)
    filled = [d for d in dists if d.counts.size]
    if not filled:
        return Dist(0, np.zeros(0, dtype=np.int64), zeros)
    lo = min(d.offset for d in filled)
    hi = max(d.offset + d.counts.size for d in filled)
    out = np.zeros(hi - lo, dtype=np.int64)
    for d in filled:
        start = d.offset - lo
        out[start:start + d.counts.size] += d.counts
    if out.size > MAX_BINS:
        cut = out.size - MAX_BINS
        out[cut] += out[:cut].sum(dtype=np.int64)
        out, lo = out[cut:], lo + cut
    return Dist(lo, out, zeros)
