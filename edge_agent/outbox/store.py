"""The outbox's commit side: opening the file and what each commit round does to it.

Split from ``edge_agent.outbox.facade`` so the hot path reads without SQL and policy in the
way. ``Store`` works on the outbox's shared state (``edge_agent.outbox.state.Shared``), which
it gets at construction with the ``OutboxDB``; it never sees the façade. Every method runs on
the commit thread (or on the thread in ``open``/``close`` while no commit thread runs), except
``read_claim``, which runs on the drain's thread.

A round: take the queued results and the acknowledgements, then in one transaction delete the
acknowledged rows, expire old rows, make room (drop-oldest) or trim (reject-new), give every
taken result its seq (``seq``), insert the kept ones, store each camera's next seq, commit.
Results that would make one transaction larger than half the WAL's budget are committed in
several transactions, each storing the seqs it used, so the WAL never outgrows its slice of the
disk budget. A failed transaction puts everything back (no seq was used) and is retried next
round.
"""

from __future__ import annotations

import collections
import sqlite3
import time
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from edge_agent.config import OutboxSettings
from edge_agent.outbox.db import ROW_OVERHEAD, CorruptDatabaseError, Loaded, OutboxDB, error_kind
from edge_agent.outbox.seq import Draft, SeqBook
from edge_agent.outbox.state import Pending, Row, Shared

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


@dataclass
class Txn:
    """One transaction of a round: its results, and what it found and did."""

    chunk: list[Pending]
    cost: int
    #: Acks ride on the round's first transaction; ``upto`` (``publish``'s next number per
    #: camera when the round began) on its last.
    acks: list[tuple[int, int]]
    first: bool
    upto: dict[str, int] | None
    #: Streams' producer state to store (the round's first transaction).
    states: dict[str, bytes] = field(default_factory=dict)
    drops: dict[str, int] = field(default_factory=dict)
    #: ``chunk[lo:hi]`` is kept (``_fit``); the rest is dropped by the policy.
    lo: int = 0
    hi: int = 0
    #: Rows and bytes left in the file after making room, before the insert.
    room_rows: int = 0
    room_bytes: int = 0
    #: Exact bytes of the inserted rows, and the seq changes (set by ``_txn``).
    kept_cost: int = 0
    draft: Draft | None = None


class Store:
    """Opening, commit rounds and claims for one outbox file (seq series: ``seqs``)."""

    def __init__(self, state: Shared, db: OutboxDB, settings: OutboxSettings, *,
                 clock: Callable[[], float]) -> None:
        self.state = state
        self.db = db
        self.settings = settings
        self.path: Path = db.path
        self._clock = clock
        self._opened_before = False
        self._retry_at = 0.0
        self._retry_delay = REOPEN_MIN_S
        self._ratio = INITIAL_RATIO
        self._calibrated_at = 0.0
        self._err_logged: dict[str, float] = {}
        self.seqs = SeqBook()
        #: Per stream, the producer state committed last (``streams``); a fresh file mid-run
        #: gets it all again (``_states_stale``).
        self.states: dict[str, bytes] = {}
        self._states_stale = False
        self._update_limit()

    # ------------------------------------------------------------------ helpers

    def _log_error(self, event: str, **kw: object) -> None:
        """Log ``event`` at most once per ERROR_LOG_INTERVAL_S (per event name)."""
        now = time.monotonic()
        if now - self._err_logged.get(event, -1e9) >= ERROR_LOG_INTERVAL_S:
            self._err_logged[event] = now
            log.error(event, path=str(self.path), **kw)

    def _update_limit(self) -> None:
        budget = self.settings.max_bytes - self.db.wal_limit - 4 * self.db.page_size
        limit = max(0, int(budget / self._ratio))
        with self.state.lock:
            self.state.file.data_limit = limit

    def _calibrate(self) -> None:
        """Correct the bytes-per-row estimate by the pages the file really uses."""
        now = time.monotonic()
        if now - self._calibrated_at < 1.0 or self.state.file.bytes < 64 * self.db.page_size:
            return
        self._calibrated_at = now
        used = self.db.used_bytes()
        self._ratio = min(3.0, max(1.0, used / max(1, self.state.file.bytes)) * 1.02)
        self._update_limit()

    # ------------------------------------------------------------------ open / close

    def open_db(self) -> bool:
        """Open the file, moving a corrupt one aside; False (and retry later) on failure."""
        state, db = self.state, self.db
        moved_aside = False
        with state.db_lock:
            try:
                loaded = db.open()
            except CorruptDatabaseError as exc:
                moved_aside = True
                try:
                    moved = db.move_aside()
                except OSError as mexc:
                    self._open_failed("io", mexc)
                    return False
                with state.lock:
                    state.commit.corrupt_files += 1
                log.error("outbox_corrupt_moved_aside", path=str(self.path),
                          moved_to=str(moved), error=str(exc)[:200])
                try:
                    loaded = db.open()
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
            self._adopt(loaded, moved_aside=moved_aside)
        return True

    def _open_failed(self, kind: str, exc: BaseException) -> None:
        with self.state.lock:
            self.state.commit.db_open = False
            self.state.commit.disk_full = kind == "full"
        self._retry_at = time.monotonic() + self._retry_delay
        self._log_error("outbox_open_failed", kind=kind, error=str(exc)[:200],
                        retry_in_s=round(self._retry_delay, 1))
        self._retry_delay = min(REOPEN_MAX_S, self._retry_delay * 2)

    def _adopt(self, loaded: Loaded, *, moved_aside: bool) -> None:
        """Take over what an opened file holds (under ``db_lock``)."""
        state = self.state
        f = state.file
        self.seqs.adopt(loaded.seqs, first_open=not self._opened_before,
                        created=loaded.created, moved_aside=moved_aside)
        if self._opened_before:
            self._states_stale = bool(self.states)
        else:
            self.states = dict(loaded.states)
        with state.lock:
            base = max(f.next_id - 1, loaded.max_id)
            f.next_id = base + 1
            if self._opened_before:
                # a fresh file after one was moved aside: older ids are gone for good, and
                # the rows claimed from the old file will never be settled here
                f.id_floor = base
                state.cursor = max(state.cursor, base)
                f.last_id = base
                state.stale_claims = state.claimed_unacked
            else:
                f.last_id = loaded.max_id
            f.rows, f.bytes, f.oldest_t = loaded.rows, loaded.bytes, loaded.oldest_t
            state.commit.db_open = True
            state.commit.disk_full = False
        self._opened_before = True
        self._retry_delay = REOPEN_MIN_S
        if loaded.rows:
            log.info("outbox_opened", path=str(self.path), rows=loaded.rows, bytes=loaded.bytes)

    def close(self) -> None:
        """Checkpoint and close the file (the commit thread has stopped)."""
        with self.state.db_lock:
            self.db.close()
            with self.state.lock:
                self.state.commit.db_open = False

    # ------------------------------------------------------------------ rounds

    def round(self) -> bool:
        """One commit round; True when everything taken was written."""
        state = self.state
        if not state.commit.db_open and (
            time.monotonic() < self._retry_at or not self.open_db()
        ):
            with state.lock:
                return not state.pending
        with state.lock:
            batch = list(state.pending)
            state.pending = collections.deque()
            state.taken.rows, state.taken.bytes = len(batch), state.pend_bytes
            state.pend_bytes = 0
            acks = state.acked
            state.acked = []
            state.taken.acks, state.taken.ack_bytes = len(acks), state.acked_bytes
            state.acked_bytes = 0
            upto = dict(state.next_idx)
            states = state.stream_state
            state.stream_state = {}
        if self._states_stale:
            states = {**self.states, **states}
        seqs = self.seqs
        if not (batch or acks or states or seqs.dirty or seqs.behind(upto)
                or self._expiry_due()):
            return True
        with state.db_lock:
            return self._write(batch, acks, upto, states)

    def _expiry_due(self) -> bool:
        t = self.state.file.oldest_t
        return t is not None and t < self._clock() - self.settings.max_age_s

    def _write(self, batch: list[Pending], acks: list[tuple[int, int]],
               upto: dict[str, int], states: dict[str, bytes]) -> bool:
        """Commit ``batch`` in transactions of at most half the WAL budget each.

        ``states`` (streams' producer state) rides on the first transaction: a state that
        names a message of a later one that then fails is harmless to its producer (a track
        closed at restart that was never announced), the reverse would not be.
        """
        max_txn = self.db.wal_limit // 2
        i, first = 0, True
        while first or i < len(batch):
            j, cost = i, 0
            while j < len(batch) and (j == i or cost + batch[j][5] <= max_txn):
                cost += batch[j][5]
                j += 1
            txn = Txn(batch[i:j], cost, acks if first else [], first,
                      upto if j == len(batch) else None, states if first else {})
            started = time.perf_counter()
            try:
                self._txn(txn)
            except sqlite3.Error as exc:
                self.db.rollback()
                if first and states:
                    with self.state.lock:  # put back: newer states queued since win
                        self.state.stream_state = {**states, **self.state.stream_state}
                self._failed(exc, batch[i:], txn.acks)
                return False
            self._applied(txn, time.perf_counter() - started)
            first = False
            i = j
        # a row carrying a reset marker stays until delivered: it must not keep expiry due
        oldest = self.db.oldest_t(skip=list(self.seqs.marked_rows))
        with self.state.lock:
            self.state.file.oldest_t = oldest
        self._calibrate()
        return True

    def _txn(self, txn: Txn) -> None:
        """One transaction: acks, expiry, room, seqs, insert."""
        db, f = self.db, self.state.file
        rows, size = f.rows, f.bytes  # only the commit side writes them: no lock needed
        draft = txn.draft = self.seqs.draft(txn.upto)
        db.begin()
        if txn.acks:
            ids = [a for a, _ in txn.acks]
            db.delete_ids(ids)
            draft.acked(ids)
            rows -= len(txn.acks)
            size -= sum(c for _, c in txn.acks)
        if self._expiry_due():
            n, b = self._delete_oldest(0, 0, self._clock() - self.settings.max_age_s)
            rows, size = rows - n, size - b
            txn.drops["max_age"] = n
        self._fit(txn, rows, size)
        inserts, txn.kept_cost = draft.stamp(txn.chunk, txn.lo, txn.hi, f.next_id)
        db.insert(inserts)
        db.set_seqs(draft.rows())
        if txn.states:
            db.set_states(txn.states)
        db.commit()

    def _applied(self, txn: Txn, elapsed: float) -> None:
        """Update the shared state after a committed transaction."""
        state = self.state
        f, c = state.file, state.commit
        kept = txn.hi - txn.lo
        if txn.draft is not None:
            self.seqs.apply(txn.draft)  # the commit side's own: no lock needed
        if txn.states:
            self.states.update(txn.states)
            self._states_stale = False
        with state.lock:
            if kept:
                f.next_id += kept
                f.last_id = f.next_id - 1
            state.taken.rows -= len(txn.chunk)
            state.taken.bytes -= txn.cost
            if txn.first:  # the round's first transaction took the acks
                state.taken.acks = state.taken.ack_bytes = 0
            f.rows = txn.room_rows
            f.bytes = txn.room_bytes + txn.kept_cost
            for reason, n in txn.drops.items():
                state.commit_drops.add(reason, n)
            c.appended += kept
            c.commits += 1
            c.commit_seconds += elapsed
            c.last_commit_seconds = elapsed
            c.disk_full = False
            state.cond.notify_all()

    def _fit(self, txn: Txn, rows: int, size: int) -> None:
        """Make room for ``txn.chunk`` by the policy; set ``txn.lo``/``hi`` to the part to keep.

        Sets ``txn.room_rows``/``room_bytes`` to the rows (with the insert) and bytes (without
        it) in the file after making room. Only rows above the drain's cursor are deleted
        (claimed ones may be in flight), and never a row carrying a reset marker.
        """
        s, limit, drops = self.settings, self.state.file.data_limit, txn.drops
        chunk = txn.chunk
        lo, hi = 0, len(chunk)
        cost = txn.cost
        need_rows = rows + hi - s.max_rows
        need_bytes = size + cost - limit
        reason = "max_bytes" if need_bytes > 0 else "max_rows"
        if need_rows > 0 or need_bytes > 0:
            if s.policy == "drop-oldest":
                n, b = self._delete_oldest(need_rows, need_bytes, None)
                rows, size = rows - n, size - b
                while lo < hi and (rows + hi - lo > s.max_rows or size + cost > limit):
                    cost -= chunk[lo][5]
                    lo += 1
                drops[reason] = drops.get(reason, 0) + n + lo
            else:
                while hi > 0 and (rows + hi > s.max_rows or size + cost > limit):
                    hi -= 1
                    cost -= chunk[hi][5]
                drops[reason] = drops.get(reason, 0) + len(chunk) - hi
        txn.lo, txn.hi = lo, hi
        txn.room_rows = rows + hi - lo
        txn.room_bytes = size

    def _delete_oldest(self, need_rows: int, need_bytes: int,
                       older_than: float | None) -> tuple[int, int]:
        """Delete the oldest unclaimed rows: enough for the needs, or all older than a time.

        Rows carrying an undelivered reset marker are kept (one per camera at most).
        """
        db, keep = self.db, self.seqs.marked_rows
        with self.state.lock:
            after = self.state.cursor
        n = b = 0
        while older_than is not None or n < need_rows or b < need_bytes:
            olds = db.oldest_after(after, SCAN)
            if not olds:
                break
            runs, after, dn, dbytes, done = _pick(olds, keep, older_than, need_rows - n,
                                                   need_bytes - b)
            for lo, hi in runs:
                db.delete_range(lo - 1, hi)
            n, b = n + dn, b + dbytes
            if done:
                break
        return n, b

    def _failed(self, exc: sqlite3.Error, rest: list[Pending],
                acks: list[tuple[int, int]]) -> None:
        """Put back what a failed transaction held, bound memory, and react to the kind."""
        state, s = self.state, self.settings
        kind = error_kind(exc)
        rest_cost = sum(p[5] for p in rest)
        with state.lock:
            state.pending.extendleft(reversed(rest))
            state.pend_bytes += rest_cost
            state.taken.rows = state.taken.bytes = 0
            if acks:
                state.acked[:0] = acks
                state.acked_bytes += sum(c for _, c in acks)
            state.taken.acks = state.taken.ack_bytes = 0
            state.commit.commit_errors += 1
            state.commit.disk_full = kind == "full"
            over = state.pend_bytes - s.max_pending_bytes
            reason = state.memory_reason()
            n = 0
            while over > 0 and state.pending:
                p = state.pending.popleft() if s.policy == "drop-oldest" else state.pending.pop()
                state.pend_bytes -= p[5]
                over -= p[5]
                n += 1
            state.commit_drops.add(reason, n)
            queued = len(state.pending)
        self._log_error("outbox_commit_failed", kind=kind, error=str(exc)[:200],
                        queued_in_memory=queued)
        if kind == "corrupt":
            self._corrupt_midrun()
        elif kind == "full" and s.policy == "drop-oldest":
            self._free_space(rest_cost)

    def _free_space(self, need_bytes: int) -> None:
        """Disk full under drop-oldest: delete the oldest unclaimed rows so new ones fit."""
        db = self.db
        try:
            db.begin()
            n, b = self._delete_oldest(0, 2 * need_bytes, None)
            db.commit()
        except sqlite3.Error:
            db.rollback()
            return
        state = self.state
        with state.lock:
            state.file.rows -= n
            state.file.bytes -= b
            state.commit_drops.add("disk_full", n)

    def _corrupt_midrun(self) -> None:
        """The file broke while running: move it aside, count what it held, start afresh."""
        try:
            moved = self.db.move_aside()
        except OSError as exc:
            self.db.close_quietly()
            self._open_failed("io", exc)
            return
        state = self.state
        f = state.file
        with state.lock:
            state.commit.corrupt_files += 1
            state.commit.db_open = False
            state.commit_drops.add("corrupt", max(0, f.rows - state.unsettled_claims()))
            f.rows = f.bytes = 0
            f.oldest_t = None
        log.error("outbox_corrupt_moved_aside", path=str(self.path), moved_to=str(moved))
        self._retry_at = 0.0

    # ------------------------------------------------------------------ drain side

    def read_claim(self, limit: int) -> list[Row]:
        """Read the next rows after the cursor and advance it (the drain's thread)."""
        state = self.state
        with state.db_lock:
            if self.db.conn is None:
                return []
            try:
                rows = self.db.read_after(state.cursor, limit)
            except sqlite3.Error as exc:
                self._log_error("outbox_read_failed", kind=error_kind(exc),
                                error=str(exc)[:200])
                return []
            with state.lock:
                if rows:
                    state.cursor = rows[-1][0]
                    state.claimed_unacked += len(rows)
                else:
                    state.cursor = max(state.cursor, state.file.last_id)
        return rows


def _pick(olds: list[tuple[int, float, int]], keep: Container[int], older_than: float | None,
          rows_left: int, bytes_left: int) -> tuple[list[tuple[int, int]], int, int, int, bool]:
    """From one page of the oldest rows (id, t, size): the runs of ids to delete (inclusive),
    the id scanned up to, the rows and bytes they free, and whether the page met the need.

    ``older_than`` set: every row older than it goes; else the oldest until ``rows_left`` and
    ``bytes_left`` are freed. Ids in ``keep`` stay (and split the runs).
    """
    runs: list[tuple[int, int]] = []
    n = b = 0
    scanned = olds[0][0] - 1
    for rid, t, sz in olds:
        if rid not in keep:
            if (t >= older_than) if older_than is not None else (
                    n >= rows_left and b >= bytes_left):
                return runs, scanned, n, b, True
            n += 1
            b += sz + ROW_OVERHEAD
            if runs and runs[-1][1] == scanned:
                runs[-1] = (runs[-1][0], rid)
            else:
                runs.append((rid, rid))
        scanned = rid
    return runs, scanned, n, b, False
