"""What the outbox's threads share: one state object with one lock, handed to every part.

Why it exists: three sides of the outbox hand work to each other. The hot path (``publish``)
queues results; the commit side (the commit thread, running ``store`` and ``seq``) takes them,
gives them their seqs, writes them and knows what the file holds; the drain side (``claim`` on
the drain thread, ``ack``/``reject`` from PUBACK callbacks) reads rows and hands
acknowledgements back. All of that lives in ``Shared``, guarded by ``Shared.lock``. The façade
builds one ``Shared`` and passes it to each part at construction; no part holds the façade or
reaches into another. The seq series themselves are the commit side's alone (``seq.SeqBook``).

Who writes what (the others only read):

- hot path: appends to ``pending`` (and pops its oldest under drop-oldest), ``hot_drops`` and
  ``next_idx`` (per camera, how many results it numbered: the commit turns a number into a
  seq, so a dropped result's seq stays unused, a gap in its place), ``stream_state`` (the
  commit side takes it with the batch and puts back what a failed round held).
- commit side: takes ``pending`` and ``acked`` (and puts back what a failed transaction held),
  ``taken``, ``file``, ``commit``, ``commit_drops``, the round counters. "Commit side" is the
  commit thread, or the thread in ``open``/``close`` while no commit thread runs.
- drain side: appends to ``acked``; ``cursor`` and ``claimed_unacked`` (``claim``, ``ack``);
  ``delivered`` (``ack``) and ``drain_drops`` (``reject``).

Each counter therefore has one writing side; ``dropped()`` and ``stats()`` add them up. Every
write is under ``lock``; a side reads what only it writes without taking it. ``commit.db_open``
changes under both locks, so holding either is enough to read it.
Locks: ``db_lock`` (the SQLite connection) is always taken before ``lock``, never after.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import asdict, dataclass, field

#: One queued result: (accept time, camera, its number for the camera in this process (see
#: ``seq``), topic, payload without ``seq``, estimated cost in bytes with the seq it will get).
Pending = tuple[float, str, int, str, bytes, int]
#: One claimed row handed to the drain: (id, topic, payload).
Row = tuple[int, str, bytes]


@dataclass(slots=True)
class Drops:
    """Dropped results by reason, written by one side only."""

    by_reason: dict[str, int] = field(default_factory=dict)

    def add(self, reason: str, n: int) -> None:
        """Count ``n`` dropped results (under ``Shared.lock``)."""
        if n > 0:
            d = self.by_reason
            d[reason] = d.get(reason, 0) + n


@dataclass(slots=True)
class Taken:
    """What the running commit round took and has neither committed nor put back."""

    rows: int = 0
    bytes: int = 0
    acks: int = 0
    ack_bytes: int = 0


@dataclass(slots=True)
class FileState:
    """What the committed file holds, as the commit side last wrote it."""

    rows: int = 0
    bytes: int = 0
    oldest_t: float | None = None
    #: The id the next inserted row gets; ``last_id`` is the highest committed one.
    next_id: int = 1
    last_id: int = 0
    #: Acks at or below this id belong to a file that was moved aside.
    id_floor: int = 0
    #: Logical bytes allowed in the file (the budget less the WAL, by the measured page use).
    data_limit: int = 0


@dataclass(slots=True)
class CommitCounters:
    """The commit side's counters and the file's health flags."""

    appended: int = 0
    commits: int = 0
    commit_seconds: float = 0.0
    last_commit_seconds: float = 0.0
    corrupt_files: int = 0
    commit_errors: int = 0
    disk_full: bool = False
    db_open: bool = False


@dataclass(slots=True)
class OutboxStats(CommitCounters):
    """Counters since the process started (a snapshot, read by metrics and telemetry): the
    commit side's, and what the drain delivered and every side dropped."""

    delivered: int = 0
    dropped: dict[str, int] = field(default_factory=dict)


@dataclass(eq=False, slots=True)
class Shared:
    """The outbox's shared state: written under ``lock`` (see the module docstring)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    #: Serializes the SQLite connection. Taken before ``lock``, never after.
    db_lock: threading.Lock = field(default_factory=threading.Lock)
    #: On ``lock``: notified when rows were committed, a round ended, or the outbox closed.
    cond: threading.Condition = field(init=False)
    #: Results accepted by ``publish`` and not yet taken by a commit round.
    pending: collections.deque[Pending] = field(default_factory=collections.deque)
    pend_bytes: int = 0
    #: (id, cost) of acknowledged rows not yet taken by a commit round (deleted by it).
    acked: list[tuple[int, int]] = field(default_factory=list)
    acked_bytes: int = 0
    taken: Taken = field(default_factory=Taken)
    file: FileState = field(default_factory=FileState)
    #: Highest id claimed by the drain; rows at or below it are never dropped.
    cursor: int = 0
    #: Rows claimed and not yet acked or rejected; ``stale_claims`` of them (commit side)
    #: were claimed from a file that has since been moved aside and will never be settled.
    claimed_unacked: int = 0
    stale_claims: int = 0
    rounds_started: int = 0
    rounds_done: int = 0
    round_ok: bool = True
    stopping: bool = False
    commit: CommitCounters = field(default_factory=CommitCounters)
    delivered: int = 0
    hot_drops: Drops = field(default_factory=Drops)
    #: Per camera, the number ``publish`` gives the next result (results taken since start,
    #: refused ones included).
    next_idx: dict[str, int] = field(default_factory=dict)
    commit_drops: Drops = field(default_factory=Drops)
    drain_drops: Drops = field(default_factory=Drops)
    #: Per stream (seq series), the opaque state its producer gave with its latest queued
    #: message (``Outbox.publish_to``), not yet taken by a commit round (hot path writes).
    stream_state: dict[str, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.cond = threading.Condition(self.lock)

    # ---------------------------------------------------------------- views (under ``lock``)

    def depth(self) -> int:
        """Results accepted and neither delivered nor dropped yet."""
        acked = len(self.acked) + self.taken.acks
        return self.file.rows - acked + self.taken.rows + len(self.pending)

    def bytes_used(self) -> int:
        """Logical bytes of the queued results (what the budget counts)."""
        acked = self.acked_bytes + self.taken.ack_bytes
        return self.file.bytes - acked + self.taken.bytes + self.pend_bytes

    def oldest_t(self) -> float | None:
        """Accept time of the oldest queued result, or None when empty."""
        t = self.file.oldest_t
        if t is None and self.pending:
            t = self.pending[0][0]
        return t

    def unsettled_claims(self) -> int:
        """Rows of the current file claimed by the drain and not yet acked or rejected."""
        return self.claimed_unacked - self.stale_claims

    def memory_reason(self) -> str:
        """Why results held in memory must be dropped now (the drop reason to count)."""
        if self.commit.disk_full:
            return "disk_full"
        return "db_error" if not self.commit.db_open else "backlog"

    def dropped(self) -> dict[str, int]:
        """Dropped results by reason, all sides added up."""
        total = dict(self.hot_drops.by_reason)
        for part in (self.commit_drops, self.drain_drops):
            for reason, n in part.by_reason.items():
                total[reason] = total.get(reason, 0) + n
        return total

    def stats(self) -> OutboxStats:
        """A snapshot of every counter."""
        return OutboxStats(**asdict(self.commit), delivered=self.delivered,
                           dropped=self.dropped())
