"""``edge-hub db migrate``: a stopped SQLite hub's state copied into an empty PostgreSQL database.

A hub grows from one process on SQLite files to replicas on PostgreSQL (docs/deploy.md, "More
than one hub"). The stores are handed in (``Store``: the SQLite file, its tables with parents
first, the schema version it writes, and how it makes its schema on a database), so this module
knows nothing of what they keep. ``migrate``:

1. reads each SQLite file in one read transaction (one snapshot per file), refusing a file
   written by a newer hub; a store whose file is missing (a hub that never ran that part)
   counts as empty, a table the file lacks (written before that table existed) too;
2. lets every store make its schema on the target, its own migrations as a hub's start runs
   them, so the tables are the stores' and ``schema_migrations`` records their versions;
3. in one PostgreSQL transaction: locks the tables (two migrations cannot interleave, and no
   hub writes meanwhile), refuses a target whose tables already hold a row (``TargetNotEmpty``:
   a copy never merges into live state), copies every row in batches with its id, moves each
   identity sequence past the largest id copied (the next rollout, event or command a hub
   makes gets a new id), and compares every table's count with the source's; any difference
   rolls the whole copy back.

Only columns the target has are copied: a file of an older hub lacks some (they stay NULL, as
the hub's own migration would leave them), and a column only the source has refuses the copy.
The SQLite files are opened read-write, so SQLite may recover a journal a killed hub left,
and only read: they stay as they were, the way back. ``hub_leader`` is no store's: a hub on
PostgreSQL creates it when it starts. Nothing here prints; ``progress`` gets one line per step.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from hub.errors import HubError
from hub.storage.database import Database, PostgresDatabase, Tx
from hub.storage.migrations import SchemaTooNew

#: Rows per ``INSERT`` batch (one round trip each, with psycopg's pipelining).
BATCH = 1000
#: A progress line every this many rows of one table (besides its last).
PROGRESS_EVERY = 50_000

Progress = Callable[[str], None]


class CopyError(HubError, code="migrate_failed"):
    """A migration that cannot start or did not finish (nothing was committed)."""


class TargetNotEmpty(CopyError, code="target_not_empty"):
    """The target already holds hub state: a copy never merges into it."""


@dataclass(frozen=True)
class Store:
    """One store's part of the copy."""

    #: Its name in ``schema_migrations`` (``registry``, ``rollouts``).
    component: str
    #: Its SQLite file in the data folder.
    sqlite_file: str
    #: Its tables, each after those it references.
    tables: tuple[str, ...]
    #: The last schema version this hub knows (a file recording a higher one is refused).
    schema_version: int
    #: Makes (or migrates) its schema on a database: the store's own ``open``.
    create_schema: Callable[[Database], Awaitable[None]]


@dataclass
class Table:
    """One table of the source, as read."""

    store: Store
    name: str
    #: Its columns in the SQLite file; empty when the file lacks the table.
    columns: list[str]
    rows: int
    copied: int = 0


@dataclass
class Source:
    """The SQLite side: one open connection (and snapshot) per file present."""

    folder: Path
    tables: list[Table]
    missing: list[str] = field(default_factory=list)
    conns: dict[str, sqlite3.Connection] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        """Rows in every table."""
        return sum(t.rows for t in self.tables)


def source_folder(url: str) -> Path:
    """The data folder of ``sqlite:///ABS/DIR`` (a folder holding the hub's SQLite files)."""
    if not url.startswith("sqlite:///"):
        raise CopyError(f"--from must be sqlite:///ABSOLUTE/DATA/DIR (the hub's "
                        f"storage.data_dir), got {url!r}")
    folder = Path(url.removeprefix("sqlite://"))
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise CopyError(f"--from {folder} {what}: give the hub's data folder "
                        "(storage.data_dir), not a file")
    return folder


def target_label(url: str) -> str:
    """``url`` checked as a PostgreSQL URL without a password; how progress names it."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres") or not parts.hostname or not parts.path[1:]:
        raise CopyError("--to must be postgresql://USER@HOST:PORT/DATABASE, got "
                        f"{_no_password(url)!r}")
    if parts.password is not None:
        raise CopyError("--to holds a password: remove it from the URL and give it in a file "
                        "(--password-file or EDGE_HUB_STORAGE__DATABASE_PASSWORD_FILE)")
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def _no_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


# ------------------------------------------------------------------------------ the source
def open_source(folder: Path, stores: tuple[Store, ...]) -> Source:
    """Each store's file opened and counted (blocking); ``close_source`` when done."""
    source = Source(folder, [])
    try:
        for store in stores:
            path = folder / store.sqlite_file
            if not path.is_file():
                source.missing.append(store.sqlite_file)
                source.tables += [Table(store, t, [], 0) for t in store.tables]
                continue
            conn = source.conns[store.component] = _connect(path)
            source.tables += _read_tables(conn, path, store)
    except BaseException:
        close_source(source)
        raise
    if len(source.missing) == len(stores):
        raise CopyError(f"{folder} holds no hub state (none of "
                        f"{', '.join(s.sqlite_file for s in stores)}): is it the hub's "
                        "storage.data_dir?")
    return source


def close_source(source: Source) -> None:
    """Close the SQLite connections (ending their read transactions)."""
    for conn in source.conns.values():
        conn.close()
    source.conns.clear()


def _connect(path: Path) -> sqlite3.Connection:
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=rw", uri=True, timeout=10.0,
                               isolation_level=None, check_same_thread=False)
        conn.execute("BEGIN")  # one snapshot for counting and copying
    except sqlite3.Error as exc:
        raise CopyError(f"cannot open {path}: {exc}") from exc
    return conn


def _read_tables(conn: sqlite3.Connection, path: Path, store: Store) -> list[Table]:
    try:
        have = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "schema_migrations" in have:
            row = conn.execute("SELECT MAX(version) FROM schema_migrations WHERE component = ?",
                               (store.component,)).fetchone()
            if row[0] is not None and int(row[0]) > store.schema_version:
                raise CopyError(f"{path} holds the {store.component} schema version {row[0]}, "
                                f"newer than this edge-hub's {store.schema_version}: migrate "
                                "with the hub version that wrote it")
        out = []
        for name in store.tables:
            if name not in have:
                out.append(Table(store, name, [], 0))
                continue
            columns = [r[1] for r in conn.execute(f"PRAGMA table_info({name})")]
            rows = int(conn.execute(f"SELECT COUNT(*) FROM {name}").fetchone()[0])  # noqa: S608
            out.append(Table(store, name, columns, rows))
        return out
    except sqlite3.Error as exc:  # not a database, or a damaged one
        raise CopyError(f"cannot read {path}: {exc}") from exc


# ------------------------------------------------------------------------------ the target
def held_rows(tx: Tx, names: list[str]) -> dict[str, int]:
    """Tables of ``names`` on the target that hold rows, with their counts (tables that do not
    exist yet hold none)."""
    out = {}
    for name in names:
        if tx.execute("SELECT to_regclass(?)", (name,)).fetchone()[0] is None:
            continue
        n = int(tx.execute(f"SELECT COUNT(*) FROM {name}").fetchone()[0])  # noqa: S608
        if n:
            out[name] = n
    return out


def refuse_rows(held: dict[str, int]) -> None:
    """``TargetNotEmpty`` naming what the target holds, unless nothing."""
    if held:
        listed = ", ".join(f"{t} {n}" for t, n in held.items())
        raise TargetNotEmpty(f"the target database already holds hub state ({listed} rows): "
                             "migrate into an empty database (a copy never merges)")


async def check_target(db: PostgresDatabase, source: Source) -> dict[str, int]:
    """Dry run: reach the target and refuse it if it holds rows; writes nothing."""
    names = [t.name for t in source.tables]
    held = await db.run(lambda tx: held_rows(tx, names))
    refuse_rows(held)
    return held


async def migrate(db: PostgresDatabase, source: Source, progress: Progress) -> dict[str, int]:
    """Copy ``source`` into ``db``; the next id of each identity column's table."""
    for store in dict.fromkeys(t.store for t in source.tables):
        try:
            await store.create_schema(db)
        except SchemaTooNew as exc:
            raise CopyError(f"target: {exc}") from exc
        progress(f"schema: {store.component} version {store.schema_version} on the target")
    return await db.run(lambda tx: _copy(tx, source, progress))


def _copy(tx: Tx, source: Source, progress: Progress) -> dict[str, int]:
    names = [t.name for t in source.tables]
    # SHARE ROW EXCLUSIVE conflicts with itself and with every write: a second migration (or
    # a hub started too early) waits for this one, then finds rows and is refused
    tx.execute(f"LOCK TABLE {', '.join(names)} IN SHARE ROW EXCLUSIVE MODE")
    refuse_rows(held_rows(tx, names))
    import psycopg  # noqa: PLC0415 - loaded with the PostgreSQL driver, as ``database`` does

    for table in source.tables:
        try:
            _copy_table(tx, source, table, progress)
        except (psycopg.Error, sqlite3.Error) as exc:  # a row the target refuses, a bad file
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CopyError(f"{table.name}: {reason}; nothing was committed") from exc
    next_ids = _move_sequences(tx, names)
    for table in source.tables:
        n = int(tx.execute(f"SELECT COUNT(*) FROM {table.name}").fetchone()[0])  # noqa: S608
        if n != table.rows:
            raise CopyError(f"{table.name}: {n} rows on the target after the copy, "
                            f"{table.rows} in the source; nothing was committed")
    return next_ids


def _copy_table(tx: Tx, source: Source, table: Table, progress: Progress) -> None:
    if not table.columns:
        progress(f"{table.name}: not in the source (an older hub), 0 rows")
        return
    target = [r[0] for r in tx.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = "
        "current_schema() AND table_name = ?", (table.name,))]
    extra = [c for c in table.columns if c not in target]
    if extra:
        raise CopyError(f"{table.name}: the source has columns the target's schema lacks "
                        f"({', '.join(extra)}): was it written by a newer hub?")
    cols = ", ".join(table.columns)
    insert = (f"INSERT INTO {table.name} ({cols}) "  # noqa: S608
              f"VALUES ({', '.join('?' * len(table.columns))})")
    conn = source.conns[table.store.component]
    with _reading(conn, table) as cur:
        while batch := cur.fetchmany(BATCH):
            tx.executemany(insert, batch)
            before, table.copied = table.copied, table.copied + len(batch)
            crossed = before // PROGRESS_EVERY != table.copied // PROGRESS_EVERY
            if crossed and table.copied < table.rows:
                progress(f"{table.name}: {table.copied} of {table.rows} rows")
    progress(f"{table.name}: {table.copied} rows copied")


@contextmanager
def _reading(conn: sqlite3.Connection, table: Table) -> Iterator[sqlite3.Cursor]:
    cur = conn.execute(f"SELECT {', '.join(table.columns)} FROM {table.name}")  # noqa: S608
    try:
        yield cur
    finally:
        cur.close()


def _move_sequences(tx: Tx, names: list[str]) -> dict[str, int]:
    """Each identity column's sequence set to continue after the largest id copied."""
    rows = tx.execute(
        "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = "
        "current_schema() AND is_identity = 'YES' ORDER BY table_name").fetchall()
    out = {}
    for table, column in rows:
        if table not in names:
            continue
        next_id = int(tx.execute(
            f"SELECT COALESCE(MAX({column}), 0) + 1 FROM {table}").fetchone()[0])  # noqa: S608
        tx.execute("SELECT setval(pg_get_serial_sequence(?, ?), ?, false)",
                   (table, column, next_id))
        out[table] = next_id
    return out
