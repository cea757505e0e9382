"""The outbox's SQLite file: schema, pragmas, and the few statements the outbox runs.

Kept apart from ``edge_agent.outbox.facade`` so the policy (bounds, drops, threads) reads without
SQL in the way, and so this layer can be reasoned about on its own: every function here is
synchronous, runs on whichever thread holds the outbox's database lock, and never decides what
to drop; it only reports sizes.

Durability choices, each for a reason:

- ``journal_mode=WAL`` with ``synchronous=FULL``: a commit returns once the WAL is fsynced, so
  a committed row survives ``kill -9`` *and* a power cut (edge boxes lose power). The outbox
  commits in batches, so that is one fsync per batch, not per result.
- ``locking_mode=EXCLUSIVE``: one process owns the file; a second agent pointed at the same
  host path gets ``SQLITE_BUSY`` instead of silently sharing it, and SQLite keeps the WAL index
  in heap memory (no ``-shm`` file that could fault on a full disk).
- ``journal_size_limit`` and ``wal_autocheckpoint`` are derived from the disk budget, so the WAL
  cannot grow past a small slice of it.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import sqlite3
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: Bytes a row costs beyond its topic and payload (rowid, record header, the t column, the
#: cell pointer). Measured with SQLite 3.40 on 4 KiB pages; the outbox also corrects for the
#: real page use it observes, so this only needs to be close.
ROW_OVERHEAD = 24

#: Seconds ``open`` waits for another process's exclusive lock on the file.
OPEN_BUSY_S = 5.0

# Primary result codes (the low byte of the extended code).
SQLITE_IOERR = 10
SQLITE_CORRUPT = 11
SQLITE_FULL = 13
SQLITE_CANTOPEN = 14
SQLITE_NOTADB = 26
SQLITE_BUSY = 5

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY,
    t REAL NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS seqs (
    camera TEXT PRIMARY KEY,
    next_free INTEGER NOT NULL,
    reset_first INTEGER,
    reset_reason TEXT,
    mark_id INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS streams (
    stream TEXT PRIMARY KEY,
    state BLOB NOT NULL
);
"""

#: A file written by the agent version that reserved seqs in blocks has ``seqs`` without the
#: marker columns; its ``next_free`` is the end of the last reserved block, so the series goes
#: on there with an ``upgrade`` reset marker (the skipped rest of the block is not a loss).
_MIGRATE = """
ALTER TABLE seqs ADD COLUMN reset_first INTEGER;
ALTER TABLE seqs ADD COLUMN reset_reason TEXT;
ALTER TABLE seqs ADD COLUMN mark_id INTEGER NOT NULL DEFAULT 0;
UPDATE seqs SET reset_first = next_free, reset_reason = 'upgrade';
"""

#: One camera's row of ``seqs``: (next seq, first seq of the outstanding reset marker or
#: None, its reason or None, id of the row carrying it or 0).
SeqRow = tuple[int, int | None, str | None, int]


#: Rows per INSERT statement (4 parameters each, well under SQLite's 32,766 limit).
INSERT_ROWS = 200


@functools.lru_cache(maxsize=8)
def _insert_sql(n: int) -> str:
    # only placeholders are joined in: no value ever becomes SQL text
    return "INSERT INTO results (id, t, topic, payload) VALUES " + ",".join(["(?,?,?,?)"] * n)  # noqa: S608


class CorruptDatabaseError(Exception):
    """The file is not a usable SQLite database (to be moved aside)."""


def error_kind(exc: sqlite3.Error) -> str:
    """Classify a SQLite error: ``corrupt``, ``full``, ``busy`` or ``io`` (temporary).

    Branches on SQLite's result code, never on message text. Python < 3.11 has no code: any
    ``DatabaseError`` that is not an ``OperationalError`` is then taken as corruption.
    """
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        if isinstance(exc, sqlite3.OperationalError):
            return "io"
        return "corrupt" if isinstance(exc, sqlite3.DatabaseError) else "io"
    primary = code & 0xFF
    if primary in (SQLITE_CORRUPT, SQLITE_NOTADB):
        return "corrupt"
    if primary == SQLITE_FULL:
        return "full"
    if primary == SQLITE_BUSY:
        return "busy"
    return "io"


#: A stream's producer state (``bytes``, named apart: ``Loaded.bytes`` is a field).
Blob = bytes


@dataclass
class Loaded:
    """What an opened file already holds."""

    rows: int
    bytes: int
    oldest_t: float | None
    max_id: int
    seqs: dict[str, SeqRow]
    #: The file had no ``seqs`` table: created now (first start, or the old one was lost).
    created: bool
    #: Per stream, the producer state stored with its messages (``streams`` table).
    states: dict[str, Blob] = field(default_factory=dict)


def wal_limit_bytes(max_bytes: int) -> int:
    """The slice of the disk budget the WAL may use: 1/16, within 32 KiB..8 MiB, <= 1/4."""
    return min(max_bytes // 4, max(32 * 1024, min(8 * 1024 * 1024, max_bytes // 16)))


class OutboxDB:
    """One SQLite connection to the outbox file. Not thread-safe: the caller serializes."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.wal_limit = wal_limit_bytes(max_bytes)
        self.conn: sqlite3.Connection | None = None
        self.page_size = 4096

    # ------------------------------------------------------------------ open / close

    def open(self) -> Loaded:
        """Open (creating if needed) and check the file. Raises CorruptDatabaseError, sqlite3.Error.

        ``quick_check`` reads every page once: a few hundred ms for a full default budget, paid
        once at start, in a thread. A file that fails it would fail later, mid-run.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # timeout: wait this long for the exclusive lock of a predecessor that is still
        # exiting (a restarted pod on the same host path) before reporting SQLITE_BUSY
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=OPEN_BUSY_S
        )
        try:
            # The first statements read the header: "file is not a database" surfaces here.
            conn.execute("PRAGMA locking_mode=EXCLUSIVE")
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"journal_mode stayed {mode}")
            conn.execute("PRAGMA synchronous=FULL")
            self.page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
            pages = max(4, self.wal_limit // self.page_size // 2)
            conn.execute(f"PRAGMA wal_autocheckpoint={pages}")
            conn.execute(f"PRAGMA journal_size_limit={self.wal_limit}")
            ok = conn.execute("PRAGMA quick_check(1)").fetchone()[0]
            if ok != "ok":
                raise CorruptDatabaseError(str(ok)[:200])
            created = conn.execute(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'seqs'"
            ).fetchone()[0] == 0
            conn.executescript(_SCHEMA)
            columns = {str(r[1]) for r in conn.execute("PRAGMA table_info(seqs)")}
            if "mark_id" not in columns:
                conn.executescript(f"BEGIN IMMEDIATE; {_MIGRATE} COMMIT;")
            n, size, oldest, max_id = conn.execute(
                "SELECT count(*), coalesce(sum(length(topic) + length(payload)), 0), "
                "min(t), coalesce(max(id), 0) FROM results"
            ).fetchone()
            states = {str(k): bytes(v) for k, v in conn.execute(
                "SELECT stream, state FROM streams")}
            seqs: dict[str, SeqRow] = {
                str(c): (int(n), None if f is None else int(f), None if r is None else str(r),
                         int(m))
                for c, n, f, r, m in conn.execute(
                    "SELECT camera, next_free, reset_first, reset_reason, mark_id FROM seqs")
            }
        except sqlite3.Error as exc:
            conn.close()
            if error_kind(exc) == "corrupt":
                raise CorruptDatabaseError(str(exc)[:200]) from exc
            raise
        except CorruptDatabaseError:
            conn.close()
            raise
        self.conn = conn
        return Loaded(
            rows=int(n),
            bytes=int(size) + int(n) * ROW_OVERHEAD,
            oldest_t=None if oldest is None else float(oldest),
            max_id=int(max_id),
            seqs=seqs,
            created=created,
            states=states,
        )

    def close(self) -> None:
        """Checkpoint and close (best effort: a full disk may refuse the checkpoint)."""
        if self.conn is None:
            return
        with contextlib.suppress(sqlite3.Error):
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        try:
            self.conn.close()
        finally:
            self.conn = None

    def move_aside(self) -> Path:
        """Rename the file (and its WAL) to ``<name>.corrupt-<unix time>``; return the new name."""
        self.close_quietly()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 0
        while target.exists():
            n += 1
            target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
        for suffix in ("", "-wal", "-shm", "-journal"):
            src = Path(str(self.path) + suffix)
            if src.exists():
                shutil.move(str(src), str(target) + suffix)
        return target

    def close_quietly(self) -> None:
        """Close without checkpointing (after an error)."""
        if self.conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self.conn.close()
            self.conn = None

    # ------------------------------------------------------------------ statements

    def _c(self) -> sqlite3.Connection:
        if self.conn is None:
            raise sqlite3.OperationalError("outbox database is not open")
        return self.conn

    def begin(self) -> None:
        """Start a write transaction."""
        self._c().execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        """Commit (fsyncs the WAL)."""
        self._c().execute("COMMIT")

    def rollback(self) -> None:
        """Roll back if a transaction is open; never raises."""
        conn = self.conn
        if conn is not None and conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")

    def insert(self, rows: Sequence[tuple[int, float, str, bytes]]) -> None:
        """Insert (id, t, topic, payload) rows, ``INSERT_ROWS`` per statement.

        One multi-row statement is one SQLite step: as in ``read_after``, fewer steps means
        fewer GIL hand-offs, which matters while ``publish`` runs on another thread.
        """
        c = self._c()
        full = len(rows) - len(rows) % INSERT_ROWS
        if full:
            flat = [v for r in rows[:full] for v in r]
            n = INSERT_ROWS * 4
            c.executemany(_insert_sql(INSERT_ROWS),
                          (flat[i:i + n] for i in range(0, len(flat), n)))
        if full < len(rows):
            rest = rows[full:]
            c.execute(_insert_sql(len(rest)), [v for r in rest for v in r])

    def delete_ids(self, ids: Sequence[int]) -> None:
        """Delete rows by id (acknowledged ones), one statement per run of consecutive ids.

        Acknowledgements come back almost in order, so a round's worth is usually one range.
        """
        runs: list[tuple[int, int]] = []
        for i in sorted(ids):
            if runs and i == runs[-1][1] + 1:
                runs[-1] = (runs[-1][0], i)
            else:
                runs.append((i, i))
        self._c().executemany("DELETE FROM results WHERE id >= ? AND id <= ?", runs)

    def delete_range(self, after: int, upto: int) -> None:
        """Delete rows with ``after < id <= upto``."""
        self._c().execute("DELETE FROM results WHERE id > ? AND id <= ?", (after, upto))

    def oldest_after(self, after: int, limit: int) -> list[tuple[int, float, int]]:
        """(id, t, size) of the oldest rows with ``id > after``."""
        return [
            (int(i), float(t), int(s))
            for i, t, s in self._c().execute(
                "SELECT id, t, length(topic) + length(payload) FROM results "
                "WHERE id > ? ORDER BY id LIMIT ?",
                (after, limit),
            )
        ]

    def read_after(self, after: int, limit: int) -> list[tuple[int, str, bytes]]:
        """(id, topic, payload) of the next rows to send, in id order.

        Reads a whole page in one SQLite step (concatenated, then cut by length): Python's
        sqlite3 releases and re-takes the GIL around every step, and while paho's thread is
        busy each re-take can wait for the interpreter's switch interval. One row per step
        made the drain twice as slow as bare paho; one step per page removes that.
        """
        ids, tlens, plens, topics, blob = self._c().execute(
            "SELECT group_concat(id), group_concat(length(topic)), "
            "group_concat(length(payload)), group_concat(topic, ''), "
            "CAST(group_concat(payload, '') AS BLOB) "
            "FROM (SELECT id, topic, payload FROM results WHERE id > ? ORDER BY id LIMIT ?)",
            (after, limit),
        ).fetchone()
        if ids is None:
            return []
        out: list[tuple[int, str, bytes]] = []
        tpos = ppos = 0
        for i, tl, pl in zip(ids.split(","), tlens.split(","), plens.split(","), strict=True):
            t_end, p_end = tpos + int(tl), ppos + int(pl)
            out.append((int(i), topics[tpos:t_end], blob[ppos:p_end]))
            tpos, ppos = t_end, p_end
        # group_concat's order is the subquery's in practice, but not promised: sort by id
        out.sort(key=lambda r: r[0])
        return out

    def oldest_t(self, skip: Collection[int] = ()) -> float | None:
        """Accept time of the oldest row (other than the ids in ``skip``), or None."""
        # only placeholders are joined in, one per id of ``skip`` (a few: one per camera)
        where = f"WHERE id NOT IN ({','.join('?' * len(skip))}) " if skip else ""
        row = self._c().execute(
            f"SELECT t FROM results {where}ORDER BY id LIMIT 1", tuple(skip)  # noqa: S608
        ).fetchone()
        return None if row is None else float(row[0])

    def set_seqs(self, rows: Iterable[tuple[str, SeqRow]]) -> None:
        """Store cameras' seq state: (camera, (next seq, reset first, reset reason, mark id))."""
        self._c().executemany(
            "INSERT INTO seqs (camera, next_free, reset_first, reset_reason, mark_id) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT(camera) DO UPDATE SET "
            "next_free = excluded.next_free, reset_first = excluded.reset_first, "
            "reset_reason = excluded.reset_reason, mark_id = excluded.mark_id",
            ((cam, *row) for cam, row in rows),
        )

    def set_states(self, states: dict[str, bytes]) -> None:
        """Store streams' producer state (``Outbox.publish_to``), latest wins."""
        self._c().executemany(
            "INSERT INTO streams (stream, state) VALUES (?, ?) ON CONFLICT(stream) "
            "DO UPDATE SET state = excluded.state", states.items())

    def used_bytes(self) -> int:
        """Bytes of pages in use (file size minus free pages)."""
        c = self._c()
        pages = int(c.execute("PRAGMA page_count").fetchone()[0])
        free = int(c.execute("PRAGMA freelist_count").fetchone()[0])
        return (pages - free) * self.page_size

    def disk_bytes(self) -> int:
        """Bytes the files take on disk now (database + WAL)."""
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):
                total += Path(str(self.path) + suffix).stat().st_size
        return total
