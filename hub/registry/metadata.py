"""Registry metadata: the ``ModelVersion`` record and where it is kept.

``MetadataStore`` is the seam a PostgreSQL backend would implement (asyncpg, same table); the
default ``SqliteMetadataStore`` keeps ``registry.sqlite3`` in WAL mode on the data folder, so the
hub needs no database server. SQLite calls are blocking: every one runs on a single dedicated
worker thread that owns the connection, which also serialises writers without a lock.

Versions are immutable: ``insert`` never overwrites a row. On a (name, version) clash it
returns the row already there, and the caller decides whether that is an idempotent repeat
(same bytes) or a conflict.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import orjson

_T = TypeVar("_T")


@dataclass(frozen=True)
class ModelVersion:
    """One pushed model version. ``manifest_bytes`` are the exact bytes served and signed."""

    name: str
    version: str
    task: str
    sha256: str
    size: int
    manifest_sha256: str
    manifest_bytes: bytes = field(repr=False)
    #: base64 ed25519 signature over ``signing_payload(manifest_sha256, sha256)``, or None.
    signature: str | None
    #: Unix seconds.
    created_at: float
    #: Who pushed it, as declared by the client (informational; the token is the authority).
    pushed_by: str
    notes: str
    #: ``edge-hub models quantize``'s report (``contract.quantization.QuantizationReport`` as
    #: JSON) for an INT8 version made from another, else None.
    quantization: dict[str, Any] | None = None

    @property
    def manifest(self) -> dict[str, Any]:
        """The manifest as a dict (parsed from the stored bytes)."""
        data: dict[str, Any] = orjson.loads(self.manifest_bytes)
        return data

    def same_content(self, other: ModelVersion) -> bool:
        """True when both carry the same model bytes and manifest bytes."""
        return self.sha256 == other.sha256 and self.manifest_sha256 == other.manifest_sha256


class MetadataStore(Protocol):
    """Where model version rows live. All methods are coroutines; none blocks the loop."""

    async def open(self) -> None:
        """Create or migrate the schema."""

    async def insert(self, v: ModelVersion) -> tuple[ModelVersion, bool]:
        """Add ``v``; return (the stored row, True) or (the existing row, False) on a clash."""

    async def get(self, name: str, version: str) -> ModelVersion | None:
        """The row, or None."""

    async def list(self, name: str | None = None) -> list[ModelVersion]:
        """Rows ordered by name, then creation time."""

    async def delete(self, name: str, version: str) -> bool:
        """Remove the row; False when there was none."""

    async def sha_in_use(self, sha256: str) -> bool:
        """Whether any row still references this artifact digest."""

    async def all_shas(self) -> set[str]:
        """Every referenced artifact digest (for the start-up sweep)."""

    async def close(self) -> None:
        """Release connections."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS model_versions (
    name            TEXT    NOT NULL,
    version         TEXT    NOT NULL,
    task            TEXT    NOT NULL,
    sha256          TEXT    NOT NULL,
    size            INTEGER NOT NULL,
    manifest        BLOB    NOT NULL,
    manifest_sha256 TEXT    NOT NULL,
    signature       TEXT,
    created_at      REAL    NOT NULL,
    pushed_by       TEXT    NOT NULL,
    notes           TEXT    NOT NULL DEFAULT '',
    quantization    TEXT,
    PRIMARY KEY (name, version)
);
CREATE INDEX IF NOT EXISTS model_versions_sha256 ON model_versions (sha256);
"""
_COLS = (
    "name, version, task, sha256, size, manifest, manifest_sha256, signature, created_at, "
    "pushed_by, notes, quantization"
)
#: 2 added ``quantization`` (a nullable column: older rows read as None).
SCHEMA_VERSION = 2


def _row(r: tuple[Any, ...]) -> ModelVersion:
    return ModelVersion(
        name=r[0], version=r[1], task=r[2], sha256=r[3], size=r[4], manifest_bytes=bytes(r[5]),
        manifest_sha256=r[6], signature=r[7], created_at=r[8], pushed_by=r[9], notes=r[10],
        quantization=orjson.loads(r[11]) if r[11] else None,
    )


class SqliteMetadataStore:
    """``MetadataStore`` on one SQLite file (WAL), driven from one worker thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="registry-db")
        self._conn: sqlite3.Connection | None = None

    async def _run(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        def call() -> _T:
            if self._conn is None:
                self._conn = self._connect()
            return fn(self._conn)

        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=10.0)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")  # a version the hub acknowledged survives a crash
        conn.execute("PRAGMA foreign_keys=ON")
        conn.executescript(_SCHEMA)
        columns = {r[1] for r in conn.execute("PRAGMA table_info(model_versions)")}
        if "quantization" not in columns:  # a schema 1 database: add the column, keep the rows
            conn.execute("ALTER TABLE model_versions ADD COLUMN quantization TEXT")
        have = conn.execute("PRAGMA user_version").fetchone()[0]
        if have > SCHEMA_VERSION:
            raise RuntimeError(f"{self.path} has schema {have}, newer than this hub's")
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        return conn

    async def open(self) -> None:
        await self._run(lambda c: None)

    async def insert(self, v: ModelVersion) -> tuple[ModelVersion, bool]:
        def op(c: sqlite3.Connection) -> tuple[ModelVersion, bool]:
            try:
                c.execute(
                    f"INSERT INTO model_versions ({_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",  # noqa: S608
                    (v.name, v.version, v.task, v.sha256, v.size, v.manifest_bytes,
                     v.manifest_sha256, v.signature, v.created_at, v.pushed_by, v.notes,
                     orjson.dumps(v.quantization).decode() if v.quantization else None),
                )
            except sqlite3.IntegrityError:
                existing = self._get(c, v.name, v.version)
                assert existing is not None
                return existing, False
            return v, True

        return await self._run(op)

    @staticmethod
    def _get(c: sqlite3.Connection, name: str, version: str) -> ModelVersion | None:
        r = c.execute(
            f"SELECT {_COLS} FROM model_versions WHERE name=? AND version=?",  # noqa: S608
            (name, version),
        ).fetchone()
        return _row(r) if r else None

    async def get(self, name: str, version: str) -> ModelVersion | None:
        return await self._run(lambda c: self._get(c, name, version))

    async def list(self, name: str | None = None) -> list[ModelVersion]:
        def op(c: sqlite3.Connection) -> list[ModelVersion]:
            q = f"SELECT {_COLS} FROM model_versions"  # noqa: S608
            args: tuple[str, ...] = ()
            if name is not None:
                q += " WHERE name=?"
                args = (name,)
            q += " ORDER BY name, created_at, version"
            return [_row(r) for r in c.execute(q, args).fetchall()]

        return await self._run(op)

    async def delete(self, name: str, version: str) -> bool:
        def op(c: sqlite3.Connection) -> bool:
            cur = c.execute(
                "DELETE FROM model_versions WHERE name=? AND version=?", (name, version)
            )
            return cur.rowcount > 0

        return await self._run(op)

    async def sha_in_use(self, sha256: str) -> bool:
        def op(c: sqlite3.Connection) -> bool:
            q = "SELECT 1 FROM model_versions WHERE sha256=? LIMIT 1"
            return c.execute(q, (sha256,)).fetchone() is not None

        return await self._run(op)

    async def all_shas(self) -> set[str]:
        def op(c: sqlite3.Connection) -> set[str]:
            return {r[0] for r in c.execute("SELECT DISTINCT sha256 FROM model_versions")}

        return await self._run(op)

    async def close(self) -> None:
        def op(c: sqlite3.Connection) -> None:
            c.close()
            self._conn = None

        if self._conn is not None:
            await self._run(op)
        self._pool.shutdown(wait=True)
