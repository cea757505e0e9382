"""The durable store-and-forward outbox: the ``ResultSink`` that loses nothing it accepted.

Why it exists: the MQTT client keeps unacknowledged messages in memory only, so a broker outage
longer than memory allows, or any agent restart, would lose results. Every result goes through
this SQLite file first and leaves it only when the broker acknowledged it (PUBACK).

How (threads and invariants):

- ``publish`` (event loop thread, microseconds) assigns the camera's next ``seq``, serializes,
  and appends to an in-memory deque. A commit thread writes the deque to SQLite every
  ``commit_interval_ms`` in one transaction: that interval is the only window a crash can lose.
- Seqs: each camera draws from a block reserved durably *before* its seqs are handed out (the
  commit thread tops blocks up ahead of use; an exhausted block is reserved synchronously). A
  restart skips the rest of the reserved block, so a seq is never handed out twice, not even
  one whose result was lost in the crash window. A camera new to the file starts at the wall
  clock in microseconds, so even a deleted or corrupt file does not restart seqs at 0.
- Delivery order: rows get increasing ids in publish order; the drain claims them in id order
  (``claim``) and acknowledges them (``ack``); acknowledged rows are deleted by the commit
  thread. Claimed rows are never dropped (they may already be at the broker), so the drop
  counts are exact.
- Bounds: ``max_bytes`` (database + WAL on disk), ``max_rows``, ``max_age_s``, and
  ``max_pending_bytes`` in memory. ``drop-oldest`` deletes the oldest unclaimed rows to make
  room; ``reject-new`` refuses new results. Every drop is counted by reason and logged (first
  one at once, then one summary line per ``DROP_LOG_INTERVAL_S``).
- Faults: ENOSPC keeps results in memory (bounded) and retries each interval; a corrupt file
  is moved aside (counted) and a fresh one started; an unopenable file is retried with backoff.
  Nothing here raises into ``publish``.

Locks: ``_db_lock`` (SQLite) is always taken before ``_lock`` (memory state), never after.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from edge_agent.config import OutboxSettings
from edge_agent.contract.protocol import OutboxTelemetry, encode_dict, results_topic
from edge_agent.outbox.db import ROW_OVERHEAD, CorruptDatabaseError, OutboxDB
from edge_agent.outbox.seq import Cam, seq_base_us
from edge_agent.outbox.store import Pending, Row, StoreOps

log = structlog.get_logger(__name__)

#: Seconds between summary log lines about drops (the first drop is logged at once).
DROP_LOG_INTERVAL_S = 10.0


@dataclass
class OutboxStats:
    """Counters since the process started (read by metrics and telemetry)."""

    appended: int = 0
    delivered: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    commits: int = 0
    commit_seconds: float = 0.0
    last_commit_seconds: float = 0.0
    corrupt_files: int = 0
    commit_errors: int = 0
    disk_full: bool = False
    db_open: bool = False


class Outbox:
    """SQLite-backed ``ResultSink`` with a commit thread. See the module docstring."""

    def __init__(
        self,
        settings: OutboxSettings,
        *,
        topic_prefix: str,
        cameras: Iterable[str] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.path = Path(settings.path)
        self.topic_prefix = topic_prefix
        self._clock = clock
        self._interval = settings.commit_interval_ms / 1000.0
        self._reject_new = settings.policy == "reject-new"
        self._max_pending = settings.max_pending_bytes
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._db_lock = threading.Lock()
        self._db = OutboxDB(self.path, settings.max_bytes)
        self.stats = OutboxStats()
        self._cams: dict[str, Cam] = {}
        self._known_cams = list(cameras)
        self._topics: dict[tuple[str, str], str] = {}
        self._pending: collections.deque[Pending] = collections.deque()
        self._pend_bytes = 0
        self._taken_rows = 0  # rows taken by a commit round, not yet committed or put back
        self._taken_bytes = 0
        self._acked: list[tuple[int, int]] = []  # (id, cost) acknowledged, not yet deleted
        self._acked_bytes = 0
        self._taken_acks = 0  # acks taken by a commit round, not yet applied or put back
        self._taken_ack_bytes = 0
        self._claimed_unacked = 0
        # committed state (changed by the commit thread under both locks)
        self._rows = 0
        self._bytes = 0
        self._oldest_t: float | None = None
        self._next_id = 1
        self._last_id = 0
        self._cursor = 0  # highest id claimed by the drain; rows <= cursor are never dropped
        self._id_floor = 0  # acks below this id belong to a file that was moved aside
        self._data_limit = 0  # logical bytes allowed in the file (set by StoreOps)
        self._rounds_started = 0
        self._rounds_done = 0
        self._round_ok = True
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._drop_logged_at = 0.0
        self._drop_logged: dict[str, int] = {}
        self._ops = StoreOps(self)

    # ------------------------------------------------------------------ lifecycle

    def open(self) -> Outbox:
        """Open the file (never raises for disk trouble) and start the commit thread."""
        self._ops.open_db()
        with self._db_lock:
            self._ops.seqs.reserve_known(self._known_cams)
        self._thread = threading.Thread(target=self._run, name="outbox-commit", daemon=True)
        self._thread.start()
        return self

    async def aopen(self) -> Outbox:
        """``open`` in a thread (SQLite never runs on the event loop)."""
        return await asyncio.to_thread(self.open)

    def close(self, timeout: float = 10.0) -> None:
        """Commit what is queued (within ``timeout``), stop the thread, checkpoint, close."""
        with self._lock:
            self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._db_lock:
            self._db.close()
            self.stats.db_open = False
        with self._cond:
            self._cond.notify_all()

    async def aclose(self) -> None:
        """``close`` in a thread."""
        await asyncio.to_thread(self.close)

    def flush(self, timeout: float = 10.0) -> bool:
        """Commit now and wait; True when everything published before the call is on disk."""
        with self._cond:
            if self._thread is None:  # not opened, or closed
                return not self._pending
            target = self._rounds_started + 1
            self._wake.set()
            deadline = time.monotonic() + timeout
            while self._rounds_done < target:
                left = deadline - time.monotonic()
                if left <= 0 or self._thread is None:
                    return False
                self._cond.wait(left)
            return self._round_ok

    async def aflush(self, timeout: float = 10.0) -> bool:
        """``flush`` in a thread."""
        return await asyncio.to_thread(self.flush, timeout)

    # ------------------------------------------------------------------ hot path

    def publish(self, result: dict[str, Any]) -> int:
        """Assign the camera's next seq (set into ``result``), serialize, queue; return the seq.

        Never raises for a full outbox: a refused or dropped result is counted and logged.
        """
        cam = result["camera"]
        lock = self._lock
        with lock:
            st = self._cams.get(cam)
            if st is None or st.next >= st.limit:
                lock.release()
                try:
                    self._ops.seqs.reserve(cam)
                finally:
                    lock.acquire()
                st = self._cams[cam]
            seq = st.next
            st.next = seq + 1
            result["seq"] = seq
            key = (result["node"], cam)
            topic = self._topics.get(key)
            if topic is None:
                topic = self._topics[key] = results_topic(self.topic_prefix, key[0], cam)
            payload = encode_dict(result)
            cost = len(payload) + len(topic) + ROW_OVERHEAD
            # the common case decides with two comparisons; the rest is _refuse_reason's
            if self._reject_new or self._pend_bytes + cost > self._max_pending:
                reason = self._refuse_reason(cost)
                if reason is not None:
                    self._count_drop(reason, 1)
                    return seq
            self._pending.append((self._clock(), topic, payload, cost))
            self._pend_bytes += cost
            if self._interval == 0:
                self._wake.set()
        return seq

    def _refuse_reason(self, cost: int) -> str | None:
        """Under ``_lock``: why a new result must be refused now, or None."""
        s = self.settings
        if self._pend_bytes + cost > s.max_pending_bytes:
            if s.policy == "reject-new":
                return self._memory_reason()
            while self._pending and self._pend_bytes + cost > s.max_pending_bytes:
                self._pend_bytes -= self._pending.popleft()[3]
                self._count_drop(self._memory_reason(), 1)
        if s.policy != "reject-new":
            return None
        acked = len(self._acked) + self._taken_acks
        rows = self._rows - acked + self._taken_rows + len(self._pending) + 1
        if rows > s.max_rows:
            return "max_rows"
        acked_bytes = self._acked_bytes + self._taken_ack_bytes
        used = self._bytes - acked_bytes + self._taken_bytes + self._pend_bytes + cost
        if used > self._data_limit:
            return "max_bytes"
        return None

    def _memory_reason(self) -> str:
        if self.stats.disk_full:
            return "disk_full"
        return "db_error" if not self.stats.db_open else "backlog"

    def _count_drop(self, reason: str, n: int) -> None:
        """Under ``_lock``: count ``n`` dropped results."""
        if n > 0:
            d = self.stats.dropped
            d[reason] = d.get(reason, 0) + n

    # ------------------------------------------------------------------ drain side

    def claim(self, limit: int, timeout: float) -> list[Row]:
        """The next committed rows to send, in order (waits up to ``timeout`` for some).

        Claimed rows are never dropped by the bounds; each must be ``ack``ed (or ``reject``ed)
        once, or stays for the next process to send again.
        """
        with self._cond:
            if self._last_id <= self._cursor and not self._stop:
                self._cond.wait(timeout)
            if self._last_id <= self._cursor:
                return []
        with self._db_lock:
            return self._ops.read_claim(limit)

    def ack(self, row_id: int, size: int) -> None:
        """The broker acknowledged row ``row_id`` (``size`` = len(topic) + len(payload))."""
        with self._lock:
            if row_id > self._id_floor:
                self._acked.append((row_id, size + ROW_OVERHEAD))
                self._acked_bytes += size + ROW_OVERHEAD
                self._claimed_unacked -= 1
            self.stats.delivered += 1

    def reject(self, row_id: int, size: int, reason: str) -> None:
        """The broker refused row ``row_id`` for good: delete it and count it as dropped."""
        with self._lock:
            if row_id > self._id_floor:
                self._acked.append((row_id, size + ROW_OVERHEAD))
                self._acked_bytes += size + ROW_OVERHEAD
                self._claimed_unacked -= 1
            self._count_drop(reason, 1)

    # ------------------------------------------------------------------ observation

    @property
    def depth(self) -> int:
        """Results accepted and neither delivered nor dropped yet."""
        with self._lock:
            acked = len(self._acked) + self._taken_acks
            return self._rows - acked + self._taken_rows + len(self._pending)

    def bytes_used(self) -> int:
        """Logical bytes of the queued results (what the budget counts)."""
        with self._lock:
            acked = self._acked_bytes + self._taken_ack_bytes
            return self._bytes - acked + self._taken_bytes + self._pend_bytes

    def oldest_age_s(self) -> float:
        """Age of the oldest queued result, seconds (0 when empty)."""
        with self._lock:
            t = self._oldest_t
            if t is None and self._pending:
                t = self._pending[0][0]
        return 0.0 if t is None else max(0.0, self._clock() - t)

    def disk_bytes(self) -> int:
        """Bytes the outbox files take on disk now."""
        return self._db.disk_bytes()

    def dropped(self) -> dict[str, int]:
        """Dropped results by reason (a copy)."""
        with self._lock:
            return dict(self.stats.dropped)

    def snapshot(self) -> OutboxTelemetry:
        """The outbox part of a telemetry message."""
        return OutboxTelemetry(
            depth=self.depth,
            bytes=self.bytes_used(),
            oldest_age_s=round(self.oldest_age_s(), 3),
            dropped=self.dropped(),
        )

    # ------------------------------------------------------------------ commit thread

    def _run(self) -> None:
        while True:
            if self._interval > 0:
                self._wake.wait(self._interval)
            else:
                self._wake.wait()
            self._wake.clear()
            with self._lock:
                stopping = self._stop
                self._rounds_started += 1
            try:
                ok = self._ops.round()
            except Exception:  # a bug must not kill the thread that keeps results safe
                log.exception("outbox_round_failed")
                ok = False
            self._log_drops()
            with self._cond:
                self._rounds_done += 1
                self._round_ok = ok
                self._cond.notify_all()
            if stopping:
                return

    def _log_drops(self) -> None:
        now = time.monotonic()
        with self._lock:
            current = dict(self.stats.dropped)
        if current == self._drop_logged:
            return
        if self._drop_logged and now - self._drop_logged_at < DROP_LOG_INTERVAL_S:
            return
        delta = {k: v - self._drop_logged.get(k, 0) for k, v in current.items()}
        log.warning(
            "outbox_dropped",
            new={k: v for k, v in delta.items() if v},
            total=current,
            policy=self.settings.policy,
            path=str(self.path),
        )
        self._drop_logged = current
        self._drop_logged_at = now


__all__ = ["CorruptDatabaseError", "Outbox", "OutboxStats", "Row", "seq_base_us"]
