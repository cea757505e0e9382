"""Per-camera sequence numbers, assigned at commit: contiguous across restarts, never reused.

Why at commit and not in ``publish``: a seq handed out before its result is on disk is a
promise the process may not live to keep. Handing seqs out early (from blocks reserved ahead)
made every restart skip the rest of a block and every crash skip the results of its commit
window, and a subscriber could not tell those phantom gaps from lost results. So ``publish``
only numbers each camera's results in the order it takes them (``idx``, from 0 in every
process, a dict increment), and the commit thread turns the number into the seq in the
transaction that inserts the row: ``seq = base + idx``, where ``base`` is the camera's next
seq in the file when this process first commits for it. The same transaction stores the
camera's next seq (``seqs`` table), so a restart resumes exactly there: a result lost in the
crash window never had a seq, and a gap downstream always means results were dropped.

Results dropped after ``publish`` numbered them (refused under ``reject-new``, over the memory
bound while the file cannot be written, trimmed by ``_fit``, deleted by drop-oldest or
expiry) keep their number's seq unused, so every counted drop is a gap in its place. The
round's last transaction also stores the next seq past every number taken so far
(``upto``), so drops at the end are not forgotten by a restart either.

A new series (a camera new to the file; every camera when the file was created or moved aside
as corrupt at start; an ``upgrade`` from block reservations) starts at the wall clock in
microseconds, so it never goes below a lost series' seqs while the clock is sane, and carries a
reset marker (``seq_reset``: the series' first seq and the reason) on its first kept row. A
subscriber then restarts its bookkeeping there instead of counting the jump as missing. The
marker stays outstanding in ``seqs`` until the broker acknowledged the row carrying it: the
bounds never drop that row (``marked_rows``), and when the file that held it is lost mid-run
the camera's next kept row carries the marker again.

Everything here runs on the commit side only (the commit thread, or ``open``/``close`` while
none runs), so the book needs no lock; a ``Draft`` holds one transaction's changes and is
applied only once that transaction committed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from edge_agent.contract.results import with_seq
from edge_agent.outbox.db import ROW_OVERHEAD, SeqRow
from edge_agent.outbox.state import Pending

#: Reasons a series starts (``protocol.SEQ_RESET_REASONS``).
NEW_OUTBOX = "new_outbox"
CORRUPT_OUTBOX = "corrupt_outbox"
NEW_CAMERA = "new_camera"

#: A row to insert: (id, accept time, topic, payload).
Insert = tuple[int, float, str, bytes]


def seq_base_us() -> int:
    """The first seq of a new series: the wall clock in microseconds (exact in a JS number)."""
    return time.time_ns() // 1000


#: ``Series.base`` before the camera's first commit in this process.
NO_BASE = -1


@dataclass(slots=True)
class Series:
    """One camera's seq series as committed."""

    #: The seq the next committed result gets at the least (stored in the file).
    next: int
    #: The outstanding reset marker (first seq of the series, reason); None once delivered.
    reset: tuple[int, str] | None = None
    #: Id of the row that carries the marker; 0 while no kept row carries it.
    mark_id: int = 0
    #: The seq of ``publish``'s number 0 in this process (``NO_BASE`` until first used).
    base: int = NO_BASE

    def row(self) -> SeqRow:
        """The camera's row of the ``seqs`` table."""
        first, reason = self.reset if self.reset is not None else (None, None)
        return (self.next, first, reason, self.mark_id)


class SeqBook:
    """The committed seq series of one outbox file (commit side only)."""

    def __init__(self) -> None:
        self.cams: dict[str, Series] = {}
        #: Row id -> camera, for rows carrying an undelivered marker (never dropped).
        self.marked_rows: dict[int, str] = {}
        #: Cameras whose row in the file is missing or stale (a fresh file mid-run).
        self.dirty: set[str] = set()
        #: The reason a camera new to the book starts a series (decided by the first open).
        self.new_reason = NEW_CAMERA

    # ------------------------------------------------------------------ files

    def adopt(self, rows: Mapping[str, SeqRow], *, first_open: bool, created: bool,
              moved_aside: bool) -> None:
        """Take over an opened file's ``seqs`` (first open), or write ours into a fresh one."""
        if not first_open:
            # a fresh file after the previous one was moved aside mid-run: memory knows every
            # series; rows carrying markers were lost with the old file
            for s in self.cams.values():
                s.mark_id = 0
            self.marked_rows.clear()
            self.dirty = set(self.cams)
            return
        if moved_aside:
            self.new_reason = CORRUPT_OUTBOX
        elif created:
            self.new_reason = NEW_OUTBOX
        for cam, (nxt, first, reason, mark) in rows.items():
            reset = None if first is None or reason is None else (first, reason)
            s = self.cams[cam] = Series(nxt, reset, mark if reset is not None else 0)
            if s.mark_id:
                self.marked_rows[s.mark_id] = cam

    def behind(self, upto: Mapping[str, int]) -> bool:
        """True when ``publish`` numbered results past what the file stores (drops to record)."""
        for cam, n in upto.items():
            s = self.cams.get(cam)
            if s is None or s.base == NO_BASE or s.base + n > s.next:
                return True
        return False

    # ------------------------------------------------------------------ transactions

    def draft(self, upto: Mapping[str, int] | None) -> Draft:
        """A transaction's changes; ``upto`` (the round's last transaction): ``publish``'s
        next number per camera when the round took its batch."""
        return Draft(self, upto)

    def apply(self, d: Draft) -> None:
        """``d``'s transaction committed: make its changes ours."""
        self.cams.update(d.cams)
        for rid in d.cleared:
            self.marked_rows.pop(rid, None)
        self.marked_rows.update(d.new_marks)
        if d.wrote_dirty:
            self.dirty.clear()


class Draft:
    """One transaction's seq changes (copies of the series it touches), applied on commit."""

    def __init__(self, book: SeqBook, upto: Mapping[str, int] | None) -> None:
        self.book = book
        self.upto = upto
        self.cams: dict[str, Series] = {}
        #: Marked rows acknowledged in this transaction / rows it marks.
        self.cleared: list[int] = []
        self.new_marks: dict[int, str] = {}
        self.wrote_dirty = False

    def series(self, cam: str) -> Series:
        """This transaction's copy of ``cam``'s series (a new series if the book has none)."""
        s = self.cams.get(cam)
        if s is None:
            old = self.book.cams.get(cam)
            if old is None:
                first = seq_base_us()
                s = Series(first, (first, self.book.new_reason))
            else:
                s = Series(old.next, old.reset, old.mark_id, old.base)
            if s.base == NO_BASE:
                s.base = s.next
            self.cams[cam] = s
        return s

    def acked(self, ids: list[int]) -> None:
        """Rows ``ids`` are deleted after PUBACK: a marker they carried is delivered."""
        marked = self.book.marked_rows
        if not marked:
            return
        for rid in ids:
            cam = marked.get(rid)
            if cam is not None:
                s = self.series(cam)
                if s.mark_id == rid:
                    s.reset = None
                    s.mark_id = 0
                self.cleared.append(rid)

    def stamp(self, chunk: list[Pending], lo: int, hi: int,
              first_id: int) -> tuple[list[Insert], int]:
        """The rows to insert for the kept results ``chunk[lo:hi]`` (ids from ``first_id``),
        each with its seq, and their cost in bytes. The others' seqs stay unused (a gap)."""
        out: list[Insert] = []
        cost = 0
        rid = first_id
        cams = self.cams
        for t, cam, idx, topic, body, _ in chunk[lo:hi]:
            s = cams.get(cam) or self.series(cam)
            seq = s.base + idx
            s.next = seq + 1
            if s.reset is not None and s.mark_id == 0:
                payload = with_seq(body, seq, s.reset)
                s.mark_id = rid
                self.new_marks[rid] = cam
            else:
                payload = with_seq(body, seq)
            out.append((rid, t, topic, payload))
            cost += len(topic) + len(payload) + ROW_OVERHEAD
            rid += 1
        return out, cost

    def rows(self) -> Iterator[tuple[str, SeqRow]]:
        """The ``seqs`` rows this transaction writes: what it changed, and stale ones."""
        book = self.book
        if self.upto is not None:
            for cam, n in self.upto.items():
                s = self.series(cam)
                s.next = max(s.next, s.base + n)
        for cam, s in self.cams.items():
            yield cam, s.row()
        if book.dirty:
            self.wrote_dirty = True
            for cam in book.dirty:
                if cam not in self.cams:
                    yield cam, book.cams[cam].row()
