"""Per-stream seq bookkeeping of a results consumer: duplicates, gaps, late arrivals, resets.

Kept apart from the MQTT subscriber (``hub.client.results``) so that results arriving some
other way (a JSON-lines file, a Kafka bridge) get the same verdicts: feed ``Deduplicator`` each
result's (node, camera, seq, ts, ``seq_reset.first``) in arrival order. What counts as what is
in docs/results.md; in short, the agent numbers a camera's committed results without holes
across its restarts, so a hole is a loss, and a ``seq_reset`` marker says a new series began
(its outbox was replaced): that restarts the stream and is not a loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Missing-seq ranges remembered per stream. Beyond it the oldest range is forgotten (a result
#: from it arriving later then counts as a duplicate). 1,024 ranges cover any realistic outage.
MAX_MISSING_RANGES = 1024


@dataclass(frozen=True)
class Gap:
    """Seqs ``first``..``last`` (inclusive) of one camera that never arrived before ``after``."""

    node: str
    camera: str
    first: int
    last: int

    @property
    def count(self) -> int:
        """How many results are missing."""
        return self.last - self.first + 1


@dataclass(frozen=True)
class Reset:
    """``node``/``camera`` started a new seq series at ``first`` (its outbox was replaced).

    ``seq`` is the result that said so, ``previous`` the highest seq of the series before,
    ``reason`` the agent's (``protocol.SEQ_RESET_REASONS``; ``inferred`` when an agent without
    markers restarted its counter). Not a loss: seqs of the old series after ``previous`` were
    never sent, or are counted in the agent's telemetry if it dropped them.
    """

    node: str
    camera: str
    first: int
    seq: int
    previous: int
    reason: str


@dataclass
class _Stream:
    """What one (node, camera) stream has delivered so far."""

    high: int
    max_ts: float
    #: The first seq of the current series, once a marker said it (None before).
    first: int | None = None
    #: Sorted, disjoint, inclusive [lo, hi] ranges of seqs below ``high`` not yet seen.
    missing: list[list[int]] = field(default_factory=list)

    def is_new_series(self, first: int) -> bool:
        """Does a ``seq_reset`` marker with ``first`` start another series than ours?"""
        # without a known first (we joined mid-series), a new series starts above the highest
        # seq (its first seq comes from the clock); a marker at or below is our own, resent
        return first != self.first if self.first is not None else first > self.high

    def take_missing(self, seq: int) -> bool:
        """Remove ``seq`` from the missing ranges; True if it was missing."""
        for i, (lo, hi) in enumerate(self.missing):
            if seq < lo:
                return False
            if seq <= hi:
                if lo == hi:
                    del self.missing[i]
                elif seq == lo:
                    self.missing[i][0] = seq + 1
                elif seq == hi:
                    self.missing[i][1] = seq - 1
                else:
                    self.missing[i : i + 1] = [[lo, seq - 1], [seq + 1, hi]]
                return True
        return False


class Deduplicator:
    """The per-stream bookkeeping, without MQTT: feed it (node, camera, seq, ts) in arrival order.

    ``report_gaps=False`` (used in shared-subscription groups, where each member sees only a
    share of every stream) still remembers which seqs it has not seen, so a redelivery of one of
    them is not mistaken for a duplicate, but reports neither gaps nor late arrivals.
    """

    def __init__(self, *, report_gaps: bool = True, max_ranges: int = MAX_MISSING_RANGES) -> None:
        self.report_gaps = report_gaps
        self.max_ranges = max_ranges
        self._streams: dict[tuple[str, str], _Stream] = {}
        self._previous: dict[tuple[str, str], int] = {}

    def offer(self, node: str, camera: str, seq: int, ts: float,
              series_first: int | None = None) -> tuple[str, Gap | None]:
        """Classify one result as ``new``, ``late``, ``reset`` or ``duplicate``, with any gap.

        ``series_first`` is the ``first`` of the result's ``seq_reset`` marker, if it has one.
        After a ``reset``, ``previous(node, camera)`` is the old series' highest seq.
        """
        key = (node, camera)
        st = self._streams.get(key)
        if series_first is not None and (st is None or st.is_new_series(series_first)):
            new = self._start(key, st, seq, ts, series_first)
            # the new series' first results were dropped by the agent (counted there)
            gap = self._hole(new, key, series_first, seq - 1)
            return ("new" if st is None else "reset"), gap
        if st is None:
            self._start(key, None, seq, ts, None)
            return "new", None
        if seq > st.high:
            gap = self._hole(st, key, st.high + 1, seq - 1)
            st.high = seq
            st.max_ts = max(st.max_ts, ts)
            return "new", gap
        if st.take_missing(seq):
            st.max_ts = max(st.max_ts, ts)
            return ("late" if self.report_gaps else "new"), None
        if ts > st.max_ts:
            self._start(key, st, seq, ts, None)
            return "reset", None
        return "duplicate", None

    def _start(self, key: tuple[str, str], old: _Stream | None, seq: int, ts: float,
               first: int | None) -> _Stream:
        """Begin the stream (again) at ``seq``, remembering the old series' highest seq."""
        self._previous[key] = old.high if old is not None else -1
        st = self._streams[key] = _Stream(high=seq, max_ts=ts, first=first)
        return st

    def _hole(self, st: _Stream, key: tuple[str, str], lo: int, hi: int) -> Gap | None:
        """Seqs ``lo``..``hi`` of ``st`` did not arrive: remember them; the gap to report."""
        if hi < lo:
            return None
        st.missing.append([lo, hi])
        if len(st.missing) > self.max_ranges:
            del st.missing[0]
        return Gap(key[0], key[1], lo, hi) if self.report_gaps else None

    def previous(self, node: str, camera: str) -> int:
        """The highest seq of the stream's series before its last reset (-1: none)."""
        return self._previous.get((node, camera), -1)

    def streams(self) -> int:
        """How many (node, camera) streams have been seen."""
        return len(self._streams)
