"""One way to reach the hub's database, SQLite or PostgreSQL, for every store.

A store hands ``Database.run`` a plain function that takes a ``Tx`` and does its SQL; ``run``
executes it as one transaction on a worker thread (the drivers block; the event loop never
waits on the disk or the network) and returns what it returned. SQL is written once, with
``?`` placeholders and the SQL both engines share (``INSERT ... ON CONFLICT``, ``RETURNING``);
``Tx`` turns ``?`` into PostgreSQL's ``%s``. Column types that differ are named in the schema
with ``{ID}``, ``{REAL}``, ``{BLOB}``, ``{BIGINT}`` (``migrations.render``).

* SQLite (``storage.database_url`` unset): one file per store in ``storage.data_dir``, one
  connection on one thread, so writers never interleave; WAL with ``synchronous=FULL``, so a
  write the hub acknowledged survives a crash.
* PostgreSQL: a few connections (``storage.database_pool_size``), one per worker thread,
  opened on first use and again after the server dropped one. Every store shares the database.

``run(fn, fenced=True)`` is for the writes only the leader may make: on PostgreSQL the
transaction first reads the leadership epoch with a share lock (``hub_leader``, see
``leader``) and refuses with ``Fenced`` when it is not this process's. A new leader's
epoch increment waits for such a transaction to end, and every later one sees the new epoch, so
an ex-leader that was paused or cut off cannot write after a successor took over. SQLite has one
process, so one leader, by construction.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import structlog

from edge_agent.common.settings import SecretFilePolicy, read_secret
from hub.config import ConfigError, StorageSettings
from hub.errors import HubError

log = structlog.get_logger(__name__)

T = TypeVar("T")
Dialect = Literal["sqlite", "postgresql"]


class DatabaseUnavailable(HubError, code="database_unavailable", http_status=503):
    """The database cannot be reached (the request may be retried)."""


class Fenced(HubError, code="not_leader", http_status=503):
    """A leader-only write from a process that is no longer the leader."""


class Cursor(Protocol):
    """What both drivers' cursors offer."""

    rowcount: int

    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def __iter__(self) -> Any: ...


class Tx:
    """One transaction's connection, with ``?`` placeholders on both engines."""

    def __init__(self, conn: Any, dialect: Dialect) -> None:
        self._conn = conn
        self.dialect: Dialect = dialect

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.dialect == "postgresql" else sql

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Cursor:
        """Run one statement; its cursor."""
        cur: Cursor = self._conn.execute(self._sql(sql), tuple(args))
        return cur

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        """Run one statement for each row."""
        data = [tuple(r) for r in rows]
        if not data:
            return
        if self.dialect == "postgresql":
            with self._conn.cursor() as cur:
                cur.executemany(self._sql(sql), data)
        else:
            self._conn.executemany(sql, data)

    def script(self, sql: str) -> None:
        """Several statements separated by ``;`` (schema changes)."""
        for stmt in (s.strip() for s in sql.split(";")):
            if stmt:
                self._conn.execute(stmt)


class Database:
    """A SQLite file or a PostgreSQL database, with ``run`` as the one way in."""

    def __init__(self, dialect: Dialect, *, label: str) -> None:
        self.dialect: Dialect = dialect
        self.label = label
        #: The leadership epoch fenced writes must match (set by ``leader``; PostgreSQL only).
        self.epoch: int | None = None

    async def run(self, fn: Callable[[Tx], T], *, fenced: bool = False) -> T:
        """``fn`` as one transaction on a worker thread; its result."""
        raise NotImplementedError

    async def close(self) -> None:
        """Close every connection (idempotent)."""
        raise NotImplementedError

    def check_fence(self, tx: Tx) -> None:
        """Inside a transaction: refuse unless this process holds the current epoch."""
        if self.dialect != "postgresql":
            return
        row = tx.execute("SELECT epoch FROM hub_leader WHERE id = 1 FOR SHARE").fetchone()
        current = row[0] if row else None
        if self.epoch is None or current != self.epoch:
            raise Fenced(f"this hub is not the leader (its epoch {self.epoch}, the database's "
                         f"{current}); the write was refused")


#: How long a SQLite connection waits for another's lock before "database is locked".
BUSY_TIMEOUT_S = 10.0


def enable_wal(conn: sqlite3.Connection, *, timeout_s: float = BUSY_TIMEOUT_S) -> None:
    """Put the file in WAL mode, waiting up to ``timeout_s`` for other connections.

    Switching a new file to WAL needs its exclusive lock, and SQLite answers "database is
    locked" at once, without its busy timeout, when connections opening the same new file at
    the same moment would otherwise wait on each other (the hub's stores open together at
    start: 2 to 7 of 200 trials of 8 such connections failed here). So the switch is retried, with a
    short growing pause, until it succeeds or ``timeout_s`` has passed.
    """
    deadline = time.monotonic() + timeout_s
    pause = 0.005
    while True:
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + pause > deadline:
                raise
            time.sleep(pause)  # on the database's own thread, never the event loop
            pause = min(pause * 2, 0.1)
            continue
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"the database stayed in journal mode {mode!r}, "
                                           "not WAL")
        return


class SqliteDatabase(Database):
    """One SQLite file, one connection, one thread."""

    def __init__(self, path: Path, *, label: str) -> None:
        super().__init__("sqlite", label=label)
        self.path = path
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{label}-db")
        self._conn: sqlite3.Connection | None = None
        self._closed = False

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=BUSY_TIMEOUT_S,
                               check_same_thread=False)
        try:
            enable_wal(conn)
            conn.execute("PRAGMA synchronous=FULL")
        except BaseException:
            conn.close()
            raise
        return conn

    async def run(self, fn: Callable[[Tx], T], *, fenced: bool = False) -> T:
        def call() -> T:
            if self._closed:
                raise RuntimeError(f"the {self.label} database is closed")
            if self._conn is None:
                self._conn = self._connect()
            conn = self._conn
            conn.execute("BEGIN")
            try:
                out = fn(Tx(conn, "sqlite"))
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return out

        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    async def close(self) -> None:
        if self._closed:
            return

        def op() -> None:
            self._closed = True
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await asyncio.get_running_loop().run_in_executor(self._pool, op)
        # the worker is idle now; joining it is still a wait, so not on the event loop
        await asyncio.to_thread(self._pool.shutdown, wait=True)


class PostgresDatabase(Database):
    """A PostgreSQL database: one connection per worker thread, reopened when dropped."""

    def __init__(self, url: str, *, password_file: Path | None = None,
                 secret_files: SecretFilePolicy = "refuse",  # noqa: S107 - a policy
                 pool_size: int, label: str, idle_in_transaction_s: float | None = None) -> None:
        super().__init__("postgresql", label=label)
        self.url = url
        self._password_file = password_file
        self._secret_files: SecretFilePolicy = secret_files
        #: The server aborts a transaction of ours left open this long (a paused leader's
        #: fenced write must not hold its successor's epoch increment for longer).
        self.idle_in_transaction_s = idle_in_transaction_s
        self._pool = ThreadPoolExecutor(max_workers=pool_size, thread_name_prefix=f"{label}-pg")
        self._local = threading.local()
        self._conns: list[Any] = []
        self._lock = threading.Lock()
        self._closed = False

    def connect(self, **options: Any) -> Any:
        """A new autocommit connection (also for the leadership's own session). Blocking."""
        import psycopg  # noqa: PLC0415 - only PostgreSQL hubs need the driver loaded

        kwargs: dict[str, Any] = {"autocommit": True, "connect_timeout": 10,
                                  "application_name": "edge-hub", **options}
        if self._password_file is not None:  # read at each connect: a rotated Secret works
            try:
                kwargs["password"] = read_secret(self._password_file, self._secret_files)
            except OSError as exc:
                raise ConfigError([("storage.database_password_file",
                                    f"cannot read: {exc.strerror or exc}",
                                    str(self._password_file))]) from exc
        try:
            return psycopg.connect(self.url, **kwargs)
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailable(f"cannot connect to PostgreSQL: {_reason(exc)}") from exc

    def _conn(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            conn = self.connect()
            if self.idle_in_transaction_s is not None:
                ms = int(self.idle_in_transaction_s * 1000)
                conn.execute(f"SET idle_in_transaction_session_timeout = {ms}")
            self._local.conn = conn
            with self._lock:
                if self._closed:
                    conn.close()
                    raise RuntimeError(f"the {self.label} database is closed")
                self._conns.append(conn)
        return conn

    async def run(self, fn: Callable[[Tx], T], *, fenced: bool = False) -> T:
        import psycopg  # noqa: PLC0415

        def call() -> T:
            if self._closed:
                raise RuntimeError(f"the {self.label} database is closed")
            conn = self._conn()
            try:
                with conn.transaction():
                    tx = Tx(conn, "postgresql")
                    if fenced:
                        self.check_fence(tx)
                    return fn(tx)
            except psycopg.OperationalError as exc:
                # the server or the network dropped the connection: a new one next time
                conn.close()
                raise DatabaseUnavailable(f"PostgreSQL: {_reason(exc)}") from exc

        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()
        self._pool.shutdown(wait=False)


def _reason(exc: BaseException) -> str:
    """The driver's message without the connection string (it may name the user and host,
    never the password, which is passed separately)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def open_database(storage: StorageSettings, sqlite_file: str, *, label: str,
                  secret_files: SecretFilePolicy = "refuse",  # noqa: S107 - a policy
                  pool_size: int | None = None) -> Database:
    """The database of one store: ``storage.database_url`` (PostgreSQL, ``pool_size``
    connections, default ``storage.database_pool_size``) or the SQLite file ``sqlite_file`` in
    ``storage.data_dir``."""
    if storage.database_url is None:
        return SqliteDatabase(Path(storage.data_dir) / sqlite_file, label=label)
    return PostgresDatabase(storage.database_url, password_file=storage.database_password_file,
                            secret_files=secret_files,
                            pool_size=pool_size or storage.database_pool_size, label=label,
                            idle_in_transaction_s=storage.leader_lease_s)
