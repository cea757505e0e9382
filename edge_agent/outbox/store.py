"""The outbox's commit thread side: what each commit round does to the SQLite file.

Split out of ``edge_agent.outbox.facade`` for size (with ``edge_agent.outbox.seq`` for the seq
blocks); they are one unit. ``StoreOps`` works on the ``Outbox``'s state directly and follows
its lock order (``_db_lock`` before ``_lock``). Every method runs on the commit thread, except
``read_claim`` (the drain), under ``_db_lock``.

A round: take the queued results and the acknowledgements, then in one transaction delete the
acknowledged rows, persist seq reservations, expire old rows, make room (drop-oldest) or trim
(reject-new), insert, commit. Results that would make one transaction larger than half the
WAL's budget are committed in several transactions, so the WAL never outgrows its slice of the
disk budget. A failed transaction puts everything back and is retried next round.
"""

from __future__ import annotations

import collections
import sqlite3
import time
from typing import TYPE_CHECKING

import structlog

from edge_agent.outbox.db import ROW_OVERHEAD, CorruptDatabaseError, Loaded, error_kind
from edge_agent.outbox.seq import Cam, SeqBlocks

if TYPE_CHECKING:
    from edge_agent.outbox.facade import Outbox

log = structlog.get_logger("edge_agent.outbox.facade")

#: Seconds between repeated log lines about the same failing condition.
ERROR_LOG_INTERVAL_S = 10.0
#: Reopen backoff bounds when the file cannot be opened, seconds.
REOPEN_MIN_S = 0.5
REOPEN_MAX_S = 30.0
#: Rows scanned per query when looking for rows to drop or expire.
SCAN = 512
#: Page-use ratio assumed before the first measurement (B-tree interior pages, slack).
INITIAL_RATIO = 1.08

#: One queued result: (accept time, topic, payload, cost in bytes).
Pending = tuple[float, str, bytes, int]
#: One claimed row handed to the drain: (id, topic, payload).
Row = tuple[int, str, bytes]


class StoreOps:
    """Commit rounds, (re)opening and claiming for one ``Outbox`` (seqs: ``self.seqs``)."""

    def __init__(self, ob: Outbox) -> None:
        self.ob = ob
        self._opened_before = False
        self._retry_at = 0.0
        self._retry_delay = REOPEN_MIN_S
        self._ratio = INITIAL_RATIO
        self._calibrated_at = 0.0
        self._err_logged: dict[str, float] = {}
        self._room_rows = 0  # set by _fit: rows in the file after making room, with the insert
        self._room_bytes = 0  # set by _fit: bytes in the file after making room, without it
        self.seqs = SeqBlocks(ob, self._log_error)
        self._update_limit()

    # ------------------------------------------------------------------ helpers

    def _log_error(self, event: str, **kw: object) -> None:
        """Log ``event`` at most once per ERROR_LOG_INTERVAL_S (per event name)."""
        now = time.monotonic()
        if now - self._err_logged.get(event, -1e9) >= ERROR_LOG_INTERVAL_S:
            self._err_logged[event] = now
            log.error(event, path=str(self.ob.path), **kw)

    def _update_limit(self) -> None:
        ob = self.ob
        budget = ob.settings.max_bytes - ob._db.wal_limit - 4 * ob._db.page_size
        ob._data_limit = max(0, int(budget / self._ratio))

    def _calibrate(self) -> None:
        """Correct the bytes-per-row estimate by the pages the file really uses."""
        ob = self.ob
        now = time.monotonic()
        if now - self._calibrated_at < 1.0 or ob._bytes < 64 * ob._db.page_size:
            return
        self._calibrated_at = now
        used = ob._db.used_bytes()
        self._ratio = min(3.0, max(1.0, used / max(1, ob._bytes)) * 1.02)
        self._update_limit()

    # ------------------------------------------------------------------ open

    def open_db(self) -> bool:
        """Open the file, moving a corrupt one aside; False (and retry later) on failure."""
        ob = self.ob
        with ob._db_lock:
            try:
                loaded = ob._db.open()
            except CorruptDatabaseError as exc:
                try:
                    moved = ob._db.move_aside()
                except OSError as mexc:
                    self._open_failed("io", mexc)
                    return False
                with ob._lock:
                    ob.stats.corrupt_files += 1
                log.error("outbox_corrupt_moved_aside", path=str(ob.path), moved_to=str(moved),
                          error=str(exc)[:200])
                try:
                    loaded = ob._db.open()
                except (CorruptDatabaseError, sqlite3.Error, OSError) as exc2:
                    kind = error_kind(exc2) if isinstance(exc2, sqlite3.Error) else "io"
                    self._open_failed(kind, exc2)
                    return False
            except sqlite3.Error as exc:
                self._open_failed(error_kind(exc), exc)
                return False
            except OSError as exc:
                self._open_failed("io", exc)
                return False
            self._adopt(loaded)
        return True

    def _open_failed(self, kind: str, exc: BaseException) -> None:
        ob = self.ob
        with ob._lock:
            ob.stats.db_open = False
            ob.stats.disk_full = kind == "full"
        self._retry_at = time.monotonic() + self._retry_delay
        self._log_error("outbox_open_failed", kind=kind, error=str(exc)[:200],
                        retry_in_s=round(self._retry_delay, 1))
        self._retry_delay = min(REOPEN_MAX_S, self._retry_delay * 2)

    def _adopt(self, loaded: Loaded) -> None:
        """Take over what an opened file holds (under ``_db_lock``)."""
        ob = self.ob
        with ob._lock:
            base = max(ob._next_id - 1, loaded.max_id)
            ob._next_id = base + 1
            if self._opened_before:
                # a fresh file after one was moved aside: older ids are gone for good
                ob._id_floor = base
                ob._cursor = max(ob._cursor, base)
                ob._last_id = base
                ob._claimed_unacked = 0
            else:
                ob._last_id = loaded.max_id
            ob._rows, ob._bytes, ob._oldest_t = loaded.rows, loaded.bytes, loaded.oldest_t
            for cam, nxt in loaded.seqs.items():
                st = ob._cams.get(cam)
                if st is None:
                    ob._cams[cam] = Cam(next=nxt, limit=nxt, durable=nxt)
                else:
                    st.next = max(st.next, nxt)
                    st.durable = nxt
                    st.limit = st.next  # reserve again before handing more out
            ob.stats.db_open = True
            ob.stats.disk_full = False
        self._opened_before = True
        self._retry_delay = REOPEN_MIN_S
        if loaded.rows:
            log.info("outbox_opened", path=str(ob.path), rows=loaded.rows, bytes=loaded.bytes)

    # ------------------------------------------------------------------ rounds

    def round(self) -> bool:
        """One commit round; True when everything taken was written."""
        ob = self.ob
        if not ob.stats.db_open:
            if time.monotonic() < self._retry_at or not self.open_db():
                return not ob._pending
            with ob._db_lock:
                self.seqs.reserve_known([])
        with ob._lock:
            batch = list(ob._pending)
            ob._pending = collections.deque()
            ob._taken_rows, ob._taken_bytes = len(batch), ob._pend_bytes
            ob._pend_bytes = 0
            acks = ob._acked
            ob._acked = []
            ob._taken_acks, ob._taken_ack_bytes = len(acks), ob._acked_bytes
            ob._acked_bytes = 0
            seqs = self.seqs.targets()
            rows, size = ob._rows, ob._bytes
        if not batch and not acks and not seqs and not self._expiry_due():
            return True
        with ob._db_lock:
            return self._write(batch, acks, seqs, rows, size)

    def _expiry_due(self) -> bool:
        ob = self.ob
        t = ob._oldest_t
        return t is not None and t < ob._clock() - ob.settings.max_age_s

    def _write(self, batch: list[Pending], acks: list[tuple[int, int]],
               seqs: dict[str, int], rows: int, size: int) -> bool:
        """Commit ``batch`` in transactions of at most half the WAL budget each."""
        ob = self.ob
        max_txn = ob._db.wal_limit // 2
        i, first = 0, True
        while first or i < len(batch):
            j, cost = i, 0
            while j < len(batch) and (j == i or cost + batch[j][3] <= max_txn):
                cost += batch[j][3]
                j += 1
            chunk = batch[i:j]
            drops: dict[str, int] = {}
            started = time.perf_counter()
            try:
                kept = self._txn(chunk, acks if first else [], seqs if first else {},
                                 rows=rows, size=size, drops=drops)
            except sqlite3.Error as exc:
                ob._db.rollback()
                self._failed(exc, batch[i:], acks if first else [])
                return False
            self._applied(chunk, cost, kept, seqs=seqs if first else None, drops=drops,
                          elapsed=time.perf_counter() - started)
            rows, size = ob._rows, ob._bytes
            first = False
            i = j
        oldest = ob._db.oldest_t()
        with ob._lock:
            ob._oldest_t = oldest
        self._calibrate()
        return True

    def _txn(self, chunk: list[Pending], acks: list[tuple[int, int]], seqs: dict[str, int],
             *, rows: int, size: int, drops: dict[str, int]) -> list[Pending]:
        """One transaction: acks, seqs, expiry, room, insert. Returns the rows inserted."""
        ob = self.ob
        db = ob._db
        db.begin()
        if acks:
            db.delete_ids([a for a, _ in acks])
            rows -= len(acks)
            size -= sum(c for _, c in acks)
        if seqs:
            db.set_seqs(seqs)
        if self._expiry_due():
            n, b = self._delete_oldest(0, 0, ob._clock() - ob.settings.max_age_s)
            rows, size = rows - n, size - b
            drops["max_age"] = n
        kept = self._fit(chunk, rows, size, drops)
        ids = range(ob._next_id, ob._next_id + len(kept))
        db.insert([(k, p[0], p[1], p[2]) for k, p in zip(ids, kept, strict=True)])
        db.commit()
        return kept

    def _applied(self, chunk: list[Pending], cost: int, kept: list[Pending], *,
                 seqs: dict[str, int] | None, drops: dict[str, int], elapsed: float) -> None:
        """Update the in-memory state after a committed transaction."""
        ob = self.ob
        kept_cost = sum(p[3] for p in kept)
        with ob._lock:
            if kept:
                ob._next_id += len(kept)
                ob._last_id = ob._next_id - 1
            ob._taken_rows -= len(chunk)
            ob._taken_bytes -= cost
            if seqs is not None:
                ob._taken_acks = ob._taken_ack_bytes = 0
                for cam, w in seqs.items():
                    st = ob._cams[cam]
                    st.durable = max(st.durable, w)
                    st.limit = max(st.limit, w)
            ob._rows = self._room_rows
            ob._bytes = self._room_bytes + kept_cost
            for reason, n in drops.items():
                ob._count_drop(reason, n)
            ob.stats.appended += len(kept)
            ob.stats.commits += 1
            ob.stats.commit_seconds += elapsed
            ob.stats.last_commit_seconds = elapsed
            ob.stats.disk_full = False
            ob._cond.notify_all()

    def _fit(self, chunk: list[Pending], rows: int, size: int,
             drops: dict[str, int]) -> list[Pending]:
        """Make room for ``chunk`` by the policy; return the part of it to insert.

        Sets ``_room_rows``/``_room_bytes`` to the rows and bytes left in the file before the
        insert. Only rows above the drain's cursor are deleted (claimed ones may be in flight).
        """
        ob = self.ob
        s = ob.settings
        cost = sum(p[3] for p in chunk)
        need_rows = rows + len(chunk) - s.max_rows
        need_bytes = size + cost - ob._data_limit
        reason = "max_bytes" if need_bytes > 0 else "max_rows"
        kept = chunk
        if need_rows > 0 or need_bytes > 0:
            if s.policy == "drop-oldest":
                n, b = self._delete_oldest(need_rows, need_bytes, None)
                rows, size = rows - n, size - b
                drops[reason] = drops.get(reason, 0) + n
                start = 0
                while start < len(kept) and (
                    rows + len(kept) - start > s.max_rows
                    or size + cost > ob._data_limit
                ):
                    cost -= kept[start][3]
                    start += 1
                kept = kept[start:]
                drops[reason] = drops.get(reason, 0) + start
            else:
                end = len(kept)
                while end > 0 and (rows + end > s.max_rows or size + cost > ob._data_limit):
                    end -= 1
                    cost -= kept[end][3]
                drops[reason] = drops.get(reason, 0) + len(kept) - end
                kept = kept[:end]
        self._room_rows = rows + len(kept)
        self._room_bytes = size
        return kept

    def _delete_oldest(self, need_rows: int, need_bytes: int,
                       older_than: float | None) -> tuple[int, int]:
        """Delete the oldest unclaimed rows: enough for the needs, or all older than a time."""
        ob = self.ob
        db = ob._db
        after = ob._cursor
        n = b = 0
        while older_than is not None or n < need_rows or b < need_bytes:
            olds = db.oldest_after(after, SCAN)
            if not olds:
                break
            upto = after
            done = False
            for rid, t, sz in olds:
                if older_than is not None:
                    if t >= older_than:
                        done = True
                        break
                elif n >= need_rows and b >= need_bytes:
                    done = True
                    break
                n += 1
                b += sz + ROW_OVERHEAD
                upto = rid
            if upto > after:
                db.delete_range(after, upto)
                after = upto
            if done:
                break
        return n, b

    def _failed(self, exc: sqlite3.Error, rest: list[Pending],
                acks: list[tuple[int, int]]) -> None:
        """Put back what a failed transaction held, bound memory, and react to the kind."""
        ob = self.ob
        kind = error_kind(exc)
        with ob._lock:
            rest_cost = sum(p[3] for p in rest)
            ob._pending.extendleft(reversed(rest))
            ob._pend_bytes += rest_cost
            ob._taken_rows = ob._taken_bytes = 0
            if acks:
                ob._acked[:0] = acks
                ob._acked_bytes += sum(c for _, c in acks)
            ob._taken_acks = ob._taken_ack_bytes = 0
            ob.stats.commit_errors += 1
            ob.stats.disk_full = kind == "full"
            over = ob._pend_bytes - ob.settings.max_pending_bytes
            reason = ob._memory_reason()
            n = 0
            while over > 0 and ob._pending:
                p = ob._pending.popleft() if ob.settings.policy == "drop-oldest" \
                    else ob._pending.pop()
                ob._pend_bytes -= p[3]
                over -= p[3]
                n += 1
            ob._count_drop(reason, n)
        self._log_error("outbox_commit_failed", kind=kind, error=str(exc)[:200],
                        queued_in_memory=len(ob._pending))
        if kind == "corrupt":
            self._corrupt_midrun()
        elif kind == "full" and ob.settings.policy == "drop-oldest":
            self._free_space(rest_cost)

    def _free_space(self, need_bytes: int) -> None:
        """Disk full under drop-oldest: delete the oldest unclaimed rows so new ones fit."""
        ob = self.ob
        db = ob._db
        try:
            db.begin()
            n, b = self._delete_oldest(0, 2 * need_bytes, None)
            db.commit()
        except sqlite3.Error:
            db.rollback()
            return
        with ob._lock:
            ob._rows -= n
            ob._bytes -= b
            ob._count_drop("disk_full", n)

    def _corrupt_midrun(self) -> None:
        """The file broke while running: move it aside, count what it held, start afresh."""
        ob = self.ob
        try:
            moved = ob._db.move_aside()
        except OSError as exc:
            ob._db.close_quietly()
            self._open_failed("io", exc)
            return
        with ob._lock:
            ob.stats.corrupt_files += 1
            ob.stats.db_open = False
            ob._count_drop("corrupt", max(0, ob._rows - ob._claimed_unacked))
            ob._rows = ob._bytes = 0
            ob._oldest_t = None
        log.error("outbox_corrupt_moved_aside", path=str(ob.path), moved_to=str(moved))
        self._retry_at = 0.0

    # ------------------------------------------------------------------ drain side

    def read_claim(self, limit: int) -> list[Row]:
        """Read the next rows after the cursor and advance it (under ``_db_lock``)."""
        ob = self.ob
        if ob._db.conn is None:
            return []
        try:
            rows = ob._db.read_after(ob._cursor, limit)
        except sqlite3.Error as exc:
            self._log_error("outbox_read_failed", kind=error_kind(exc), error=str(exc)[:200])
            return []
        with ob._lock:
            if rows:
                ob._cursor = rows[-1][0]
                ob._claimed_unacked += len(rows)
            else:
                ob._cursor = max(ob._cursor, ob._last_id)
        return rows
