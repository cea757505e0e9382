"""Registry metadata: the ``ModelVersion`` record and where it is kept.

``MetadataStore`` is the seam; ``SqlMetadataStore`` implements it on the hub's database
(``hub.storage``): ``registry.sqlite3`` in WAL mode on the data folder by default, so the hub
needs no database server, or the PostgreSQL database every replica shares. Any replica may
push: the primary key decides a race between two of them.

Versions are immutable: ``insert`` never overwrites a row. On a (name, version) clash it
returns the row already there, and the caller decides whether that is an idempotent repeat
(same bytes) or a conflict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson

from edge_agent.common.settings import SecretFilePolicy
from hub.config import StorageSettings
from hub.storage.database import Database, SqliteDatabase, Tx, open_database
from hub.storage.migrations import Migration, migrate


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


MIGRATIONS = (
    Migration(1, """
CREATE TABLE IF NOT EXISTS model_versions (
    name            TEXT    NOT NULL,
    version         TEXT    NOT NULL,
    task            TEXT    NOT NULL,
    sha256          TEXT    NOT NULL,
    size            {BIGINT} NOT NULL,
    manifest        {BLOB}  NOT NULL,
    manifest_sha256 TEXT    NOT NULL,
    signature       TEXT,
    created_at      {REAL}  NOT NULL,
    pushed_by       TEXT    NOT NULL,
    notes           TEXT    NOT NULL DEFAULT '',
    PRIMARY KEY (name, version)
);
CREATE INDEX IF NOT EXISTS model_versions_sha256 ON model_versions (sha256)"""),
    # the report of ``edge-hub models quantize`` (a nullable column: older rows read as None)
    Migration(2, "ALTER TABLE model_versions ADD COLUMN quantization TEXT"),
)
_COLS = (
    "name, version, task, sha256, size, manifest, manifest_sha256, signature, created_at, "
    "pushed_by, notes, quantization"
)
#: The registry's schema version (the last migration's).
SCHEMA_VERSION = MIGRATIONS[-1].version
DB_FILE = "registry.sqlite3"


def _legacy(tx: Tx) -> set[int]:
    """Versions a ``registry.sqlite3`` from before versioned migrations already has (its
    ``user_version`` was 1, or 2 with ``quantization``)."""
    tables = {r[0] for r in tx.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if "model_versions" not in tables:
        return set()
    columns = {r[1] for r in tx.execute("PRAGMA table_info(model_versions)")}
    return {1, 2} if "quantization" in columns else {1}


def _row(r: tuple[Any, ...]) -> ModelVersion:
    return ModelVersion(
        name=r[0], version=r[1], task=r[2], sha256=r[3], size=r[4], manifest_bytes=bytes(r[5]),
        manifest_sha256=r[6], signature=r[7], created_at=r[8], pushed_by=r[9], notes=r[10],
        quantization=orjson.loads(r[11]) if r[11] else None,
    )


class SqlMetadataStore:
    """``MetadataStore`` on the hub's database (SQLite or PostgreSQL)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    @classmethod
    def from_settings(cls, storage: StorageSettings,
                      secret_files: SecretFilePolicy = "refuse") -> SqlMetadataStore:  # noqa: S107
        """The store on ``storage``'s database."""
        return cls(open_database(storage, DB_FILE, label="registry",
                                 secret_files=secret_files))

    async def open(self) -> None:
        await migrate(self.db, "registry", MIGRATIONS, legacy=_legacy)
        if isinstance(self.db, SqliteDatabase):  # what older hubs read as the version
            await self.db.run(lambda c: c.execute(f"PRAGMA user_version={SCHEMA_VERSION}"))

    async def insert(self, v: ModelVersion) -> tuple[ModelVersion, bool]:
        def op(c: Tx) -> tuple[ModelVersion, bool]:
            got = c.execute(
                f"INSERT INTO model_versions ({_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?) "  # noqa: S608
                "ON CONFLICT (name, version) DO NOTHING RETURNING name",
                (v.name, v.version, v.task, v.sha256, v.size, v.manifest_bytes,
                 v.manifest_sha256, v.signature, v.created_at, v.pushed_by, v.notes,
                 orjson.dumps(v.quantization).decode() if v.quantization else None),
            ).fetchone()
            if got is None:  # another push of this version (maybe on another replica) won
                existing = self._get(c, v.name, v.version)
                assert existing is not None
                return existing, False
            return v, True

        return await self.db.run(op)

    @staticmethod
    def _get(c: Tx, name: str, version: str) -> ModelVersion | None:
        r = c.execute(
            f"SELECT {_COLS} FROM model_versions WHERE name=? AND version=?",  # noqa: S608
            (name, version),
        ).fetchone()
        return _row(r) if r else None

    async def get(self, name: str, version: str) -> ModelVersion | None:
        return await self.db.run(lambda c: self._get(c, name, version))

    async def list(self, name: str | None = None) -> list[ModelVersion]:
        def op(c: Tx) -> list[ModelVersion]:
            q = f"SELECT {_COLS} FROM model_versions"  # noqa: S608
            args: tuple[str, ...] = ()
            if name is not None:
                q += " WHERE name=?"
                args = (name,)
            q += " ORDER BY name, created_at, version"
            return [_row(r) for r in c.execute(q, args).fetchall()]

        return await self.db.run(op)

    async def delete(self, name: str, version: str) -> bool:
        def op(c: Tx) -> bool:
            cur = c.execute(
                "DELETE FROM model_versions WHERE name=? AND version=?", (name, version)
            )
            return cur.rowcount > 0

        return await self.db.run(op)

    async def sha_in_use(self, sha256: str) -> bool:
        def op(c: Tx) -> bool:
            q = "SELECT 1 FROM model_versions WHERE sha256=? LIMIT 1"
            return c.execute(q, (sha256,)).fetchone() is not None

        return await self.db.run(op)

    async def all_shas(self) -> set[str]:
        def op(c: Tx) -> set[str]:
            return {r[0] for r in c.execute("SELECT DISTINCT sha256 FROM model_versions")}

        return await self.db.run(op)

    async def close(self) -> None:
        await self.db.close()


def SqliteMetadataStore(path: Path) -> SqlMetadataStore:  # noqa: N802 - reads as a class
    """The store on one SQLite file (tests and tools that hold a path)."""
    return SqlMetadataStore(SqliteDatabase(path, label="registry"))
