"""The durable store-and-forward outbox: the ``ResultSink`` that loses nothing it accepted.

Why it exists: the MQTT client keeps unacknowledged messages in memory only, so a broker outage
longer than memory allows, or any agent restart, would lose results. Every result goes through
this SQLite file first and leaves it only when the broker acknowledged it (PUBACK).

How (threads and invariants):

- ``publish`` (event loop thread, microseconds) serializes the result (without ``seq``) and
  appends it to an in-memory deque. A commit thread writes the deque to SQLite every
  ``commit_interval_ms`` in one transaction: that interval is the only window a crash can lose.
- Seqs (``seq``): the commit thread gives each result its camera's next seq in the transaction
  that inserts it and stores the next one there too, so seqs are contiguous across crashes and
  restarts and never reused: a result lost in the crash window never had one, and every gap
  downstream is a counted drop. A new series (a camera new to the file, a file created or moved
  aside) starts at the wall clock in microseconds and its first result carries a ``seq_reset``
  marker, so a subscriber tells a restarted counter from a loss.
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

The parts (``store`` for the commit side, ``seq`` for seq series, ``db`` for the SQLite file)
share one ``state.Shared``, built here and passed to them; which side writes what, and the lock
order (``db_lock`` before ``lock``), are in ``edge_agent.outbox.state``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import structlog

from edge_agent.config import OutboxSettings
from edge_agent.contract.protocol import OutboxTelemetry, encode_dict, results_topic
from edge_agent.contract.results import SEQ_FIELD_BYTES
from edge_agent.outbox.db import ROW_OVERHEAD, CorruptDatabaseError, OutboxDB
from edge_agent.outbox.seq import seq_base_us
from edge_agent.outbox.state import OutboxStats, Row, Shared
from edge_agent.outbox.store import Store

log = structlog.get_logger(__name__)

#: Seconds between summary log lines about drops (the first drop is logged at once).
DROP_LOG_INTERVAL_S = 10.0


class Outbox:
    """SQLite-backed ``ResultSink`` with a commit thread. See the module docstring."""

    def __init__(
        self,
        settings: OutboxSettings,
        *,
        topic_prefix: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.path = Path(settings.path)
        self.topic_prefix = topic_prefix
        self._clock = clock
        self._interval = settings.commit_interval_ms / 1000.0
        self._reject_new = settings.policy == "reject-new"
        self._max_pending = settings.max_pending_bytes
        self._state = Shared()
        self._db = OutboxDB(self.path, settings.max_bytes)
        self._store = Store(self._state, self._db, settings, clock=clock)
        # the hot path's own cache: only ``publish`` reads or writes it
        self._topics: dict[tuple[str, str], str] = {}
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._drop_logged_at = 0.0
        self._drop_logged: dict[str, int] = {}

    # ------------------------------------------------------------------ lifecycle

    def open(self) -> Outbox:
        """Open the file (never raises for disk trouble) and start the commit thread."""
        self._store.open_db()
        self._thread = threading.Thread(target=self._run, name="outbox-commit", daemon=True)
        self._thread.start()
        return self

    async def aopen(self) -> Outbox:
        """``open`` in a thread (SQLite never runs on the event loop)."""
        return await asyncio.to_thread(self.open)

    def close(self, timeout: float = 10.0) -> None:
        """Commit what is queued (within ``timeout``), stop the thread, checkpoint, close."""
        st = self._state
        with st.lock:
            st.stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._store.close()
        with st.cond:
            st.cond.notify_all()

    async def aclose(self) -> None:
        """``close`` in a thread."""
        await asyncio.to_thread(self.close)

    def flush(self, timeout: float = 10.0) -> bool:
        """Commit now and wait; True when everything published before the call is on disk."""
        st = self._state
        with st.cond:
            if self._thread is None:  # not opened, or closed
                return not st.pending
            target = st.rounds_started + 1
            self._wake.set()
            deadline = time.monotonic() + timeout
            while st.rounds_done < target:
                left = deadline - time.monotonic()
                if left <= 0 or self._thread is None:
                    return False
                st.cond.wait(left)
            return st.round_ok

    async def aflush(self, timeout: float = 10.0) -> bool:
        """``flush`` in a thread."""
        return await asyncio.to_thread(self.flush, timeout)

    # ------------------------------------------------------------------ hot path

    def publish(self, result: dict[str, Any]) -> None:
        """Serialize ``result`` (without ``seq``) and queue it; the commit gives it its seq.

        ``result`` must not hold ``seq``: the commit appends it to the serialized bytes.
        Never raises for a full outbox: a refused or dropped result is counted and logged (and
        its seq stays unused, so subscribers see the loss as a gap).
        """
        cam = result["camera"]
        key = (result["node"], cam)
        topic = self._topics.get(key)  # the hot path's own cache: no lock
        if topic is None:
            topic = self._topics[key] = results_topic(self.topic_prefix, key[0], cam)
        self._queue(cam, topic, encode_dict(result), None)

    def publish_to(self, stream: str, topic: str, message: dict[str, Any], *,
                   state: bytes | None = None) -> None:
        """Queue ``message`` (without ``seq``) on ``topic`` in seq series ``stream``.

        Everything ``publish`` promises holds: the commit gives the message the stream's next
        seq (a series of its own, e.g. ``contract.events.events_stream(camera)``; results use
        the bare camera name), same order, drops counted. ``state`` (opaque bytes, optional)
        is stored with the stream in the commit that stores this message, latest wins, and
        ``stream_states`` returns it to the next process: what the producer needs to resume
        (the tracker keeps its open tracks there).
        """
        self._queue(stream, topic, encode_dict(message), state)

    def stream_states(self) -> dict[str, bytes]:
        """Each stream's state as committed (after ``open``: what the previous process left)."""
        with self._state.db_lock:
            return dict(self._store.states)

    def _queue(self, cam: str, topic: str, body: bytes, state: bytes | None) -> None:
        cost = len(body) + SEQ_FIELD_BYTES + len(topic) + ROW_OVERHEAD
        st = self._state
        with st.lock:
            if state is not None:
                st.stream_state[cam] = state
            numbers = st.next_idx
            idx = numbers.get(cam, 0)
            numbers[cam] = idx + 1
            # the common case decides with two comparisons; the rest is _refuse_reason's
            if self._reject_new or st.pend_bytes + cost > self._max_pending:
                reason = self._refuse_reason(cost)
                if reason is not None:
                    st.hot_drops.add(reason, 1)
                    return
            st.pending.append((self._clock(), cam, idx, topic, body, cost))
            st.pend_bytes += cost
        if self._interval == 0:
            self._wake.set()

    def _refuse_reason(self, cost: int) -> str | None:
        """Under ``lock``: why a new result must be refused now, or None."""
        st, s = self._state, self.settings
        if st.pend_bytes + cost > s.max_pending_bytes:
            if s.policy == "reject-new":
                return st.memory_reason()
            while st.pending and st.pend_bytes + cost > s.max_pending_bytes:
                st.pend_bytes -= st.pending.popleft()[5]
                st.hot_drops.add(st.memory_reason(), 1)
        if s.policy != "reject-new":
            return None
        if st.depth() + 1 > s.max_rows:
            return "max_rows"
        if st.bytes_used() + cost > st.file.data_limit:
            return "max_bytes"
        return None

    # ------------------------------------------------------------------ drain side

    def claim(self, limit: int, timeout: float) -> list[Row]:
        """The next committed rows to send, in order (waits up to ``timeout`` for some).

        Claimed rows are never dropped by the bounds; each must be ``ack``ed (or ``reject``ed)
        once, or stays for the next process to send again.
        """
        st = self._state
        with st.cond:
            if st.file.last_id <= st.cursor and not st.stopping:
                st.cond.wait(timeout)
            if st.file.last_id <= st.cursor:
                return []
        return self._store.read_claim(limit)

    def ack(self, row_id: int, size: int) -> None:
        """The broker acknowledged row ``row_id`` (``size`` = len(topic) + len(payload))."""
        st = self._state
        with st.lock:
            self._settle(row_id, size)
            st.delivered += 1

    def reject(self, row_id: int, size: int, reason: str) -> None:
        """The broker refused row ``row_id`` for good: delete it and count it as dropped."""
        st = self._state
        with st.lock:
            self._settle(row_id, size)
            st.drain_drops.add(reason, 1)

    def _settle(self, row_id: int, size: int) -> None:
        """Under ``lock``: hand row ``row_id`` to the commit thread for deletion."""
        st = self._state
        if row_id > st.file.id_floor:
            st.acked.append((row_id, size + ROW_OVERHEAD))
            st.acked_bytes += size + ROW_OVERHEAD
            st.claimed_unacked -= 1

    # ------------------------------------------------------------------ observation

    @property
    def stats(self) -> OutboxStats:
        """Counters since the process started (a consistent snapshot)."""
        with self._state.lock:
            return self._state.stats()

    @property
    def depth(self) -> int:
        """Results accepted and neither delivered nor dropped yet."""
        with self._state.lock:
            return self._state.depth()

    def bytes_used(self) -> int:
        """Logical bytes of the queued results (what the budget counts)."""
        with self._state.lock:
            return self._state.bytes_used()

    def oldest_age_s(self) -> float:
        """Age of the oldest queued result, seconds (0 when empty)."""
        with self._state.lock:
            t = self._state.oldest_t()
        return 0.0 if t is None else max(0.0, self._clock() - t)

    def disk_bytes(self) -> int:
        """Bytes the outbox files take on disk now."""
        return self._db.disk_bytes()

    def dropped(self) -> dict[str, int]:
        """Dropped results by reason (a copy)."""
        with self._state.lock:
            return self._state.dropped()

    def snapshot(self) -> OutboxTelemetry:
        """The outbox part of a telemetry message."""
        return OutboxTelemetry(
            depth=self.depth,
            bytes=self.bytes_used(),
            oldest_age_s=round(self.oldest_age_s(), 3),
            dropped=self.dropped(),
        )

    @contextlib.contextmanager
    def holding_db(self) -> Iterator[None]:
        """Hold the SQLite connection while the block runs, as a long commit does.

        A test hook: ``publish`` must never wait for it.
        """
        with self._state.db_lock:
            yield

    # ------------------------------------------------------------------ commit thread

    def _run(self) -> None:
        st = self._state
        while True:
            if self._interval > 0:
                self._wake.wait(self._interval)
            else:
                self._wake.wait()
            self._wake.clear()
            with st.lock:
                stopping = st.stopping
                st.rounds_started += 1
            try:
                ok = self._store.round()
            except Exception:  # a bug must not kill the thread that keeps results safe
                log.exception("outbox_round_failed")
                ok = False
            self._log_drops()
            with st.cond:
                st.rounds_done += 1
                st.round_ok = ok
                st.cond.notify_all()
            if stopping:
                return

    def _log_drops(self) -> None:
        now = time.monotonic()
        current = self.dropped()
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
