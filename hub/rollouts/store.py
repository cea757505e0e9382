"""The rollout side's SQLite database (``rollouts.sqlite3`` in ``storage.data_dir``, WAL mode).

It holds what must survive a ``kill -9`` of the hub: every rollout with its state, plan,
per-node progress (the version each node had before, recorded before its label is touched) and
its shadow phase's latest figures, an event log per rollout, and per node the last desired state
published with its ``generation`` (which only grows) and whether the broker acknowledged it.
One connection, used by one worker thread, so the event loop never waits on the disk and
writes never interleave.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import orjson

from hub.rollouts.model import ACTIVE_STATES, NodeEntry, Rollout, RolloutSpec

DB_FILE = "rollouts.sqlite3"
T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rollouts (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  model TEXT NOT NULL,
  version TEXT NOT NULL,
  spec TEXT NOT NULL,
  state TEXT NOT NULL,
  wave INTEGER NOT NULL,
  waves INTEGER NOT NULL,
  paused_from TEXT,
  phase_started_at REAL NOT NULL,
  baseline TEXT NOT NULL,
  cause TEXT,
  message TEXT NOT NULL DEFAULT '',
  created_at REAL NOT NULL,
  updated_at REAL NOT NULL,
  finished_at REAL,
  created_by TEXT NOT NULL DEFAULT '',
  shadow TEXT
);
CREATE INDEX IF NOT EXISTS rollouts_model ON rollouts(model, state);
CREATE TABLE IF NOT EXISTS rollout_nodes (
  rollout_id INTEGER NOT NULL REFERENCES rollouts(id),
  node TEXT NOT NULL,
  wave INTEGER NOT NULL,
  status TEXT NOT NULL,
  prev_version TEXT,
  prev_recorded INTEGER NOT NULL,
  generation INTEGER NOT NULL,
  applied_at REAL,
  active_at REAL,
  error TEXT,
  PRIMARY KEY (rollout_id, node)
);
CREATE TABLE IF NOT EXISTS rollout_events (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  rollout_id INTEGER NOT NULL,
  ts REAL NOT NULL,
  kind TEXT NOT NULL,
  detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS rollout_events_rollout ON rollout_events(rollout_id, id);
CREATE TABLE IF NOT EXISTS node_desired (
  node TEXT PRIMARY KEY,
  generation INTEGER NOT NULL,
  models TEXT NOT NULL,
  digest TEXT NOT NULL,
  published INTEGER NOT NULL,
  updated_at REAL NOT NULL
);
"""


@dataclass
class DesiredRow:
    """The last desired state decided for a node."""

    node: str
    generation: int
    models: dict[str, dict[str, Any]]
    digest: str
    published: bool = False


def _rollout_row(r: Rollout) -> tuple[Any, ...]:
    return (r.spec.model, r.spec.version, r.spec.model_dump_json(), r.state, r.wave, r.waves,
            r.paused_from, r.phase_started_at, orjson.dumps(r.baseline).decode(),
            orjson.dumps(r.cause).decode() if r.cause is not None else None, r.message,
            r.created_at, r.updated_at, r.finished_at, r.created_by,
            orjson.dumps(r.shadow).decode() if r.shadow is not None else None)


def _migrate(conn: sqlite3.Connection) -> None:
    """Add the columns a database from an older hub lacks (``shadow``)."""
    have = {row[1] for row in conn.execute("PRAGMA table_info(rollouts)")}
    if "shadow" not in have:
        conn.execute("ALTER TABLE rollouts ADD COLUMN shadow TEXT")


def _node_row(rid: int, e: NodeEntry) -> tuple[Any, ...]:
    return (rid, e.node, e.wave, e.status, e.prev_version, int(e.prev_recorded), e.generation,
            e.applied_at, e.active_at, e.error)


class RolloutStore:
    """Async access to the database; every call runs in the store's own thread."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / DB_FILE
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout-db")
        self._conn: sqlite3.Connection | None = None

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            if self._conn is None:
                raise RuntimeError("rollout store is closed")
            with self._conn:  # one transaction per call
                return fn(self._conn)

        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    async def open(self) -> None:
        """Create the folder, the schema, and switch to WAL."""

        def op() -> sqlite3.Connection:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=5000")
            conn.executescript(_SCHEMA)
            _migrate(conn)
            conn.isolation_level = "DEFERRED"  # implicit transactions again, for ``with conn``
            return conn

        self._conn = await asyncio.get_running_loop().run_in_executor(self._pool, op)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await asyncio.get_running_loop().run_in_executor(self._pool, conn.close)
        self._pool.shutdown(wait=False)

    # ------------------------------------------------------------------------------ desired
    async def load_desired(self) -> dict[str, DesiredRow]:
        def op(c: sqlite3.Connection) -> dict[str, DesiredRow]:
            rows = c.execute(
                "SELECT node, generation, models, digest, published FROM node_desired"
            ).fetchall()
            return {r[0]: DesiredRow(r[0], r[1], orjson.loads(r[2]), r[3], bool(r[4]))
                    for r in rows}

        return await self._run(op)

    async def save_desired(self, rows: Iterable[DesiredRow]) -> None:
        now = time.time()
        data = [(r.node, r.generation, orjson.dumps(r.models).decode(), r.digest,
                 int(r.published), now) for r in rows]

        def op(c: sqlite3.Connection) -> None:
            c.executemany(
                "INSERT INTO node_desired(node, generation, models, digest, published, "
                "updated_at) VALUES (?,?,?,?,?,?) ON CONFLICT(node) DO UPDATE SET "
                "generation=excluded.generation, models=excluded.models, "
                "digest=excluded.digest, published=excluded.published, "
                "updated_at=excluded.updated_at WHERE excluded.generation > generation",
                data,
            )

        await self._run(op)

    async def mark_published(self, pairs: Iterable[tuple[str, int]]) -> None:
        data = list(pairs)

        def op(c: sqlite3.Connection) -> None:
            c.executemany(
                "UPDATE node_desired SET published=1 WHERE node=? AND generation=?", data
            )

        await self._run(op)

    # ----------------------------------------------------------------------------- rollouts
    async def create(self, r: Rollout) -> int:
        """Insert a rollout with its nodes; returns its id."""

        def op(c: sqlite3.Connection) -> int:
            cur = c.execute(
                "INSERT INTO rollouts(model, version, spec, state, wave, waves, paused_from, "
                "phase_started_at, baseline, cause, message, created_at, updated_at, "
                "finished_at, created_by, shadow) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                _rollout_row(r),
            )
            rid = int(cur.lastrowid or 0)
            c.executemany(
                "INSERT INTO rollout_nodes VALUES (?,?,?,?,?,?,?,?,?,?)",
                [_node_row(rid, e) for e in r.nodes.values()],
            )
            c.execute("INSERT INTO rollout_events(rollout_id, ts, kind, detail) VALUES "
                      "(?,?,?,?)", (rid, r.created_at, "created", "{}"))
            return rid

        return await self._run(op)

    async def save(self, r: Rollout, entries: Iterable[NodeEntry] = (),
                   event: tuple[str, dict[str, Any]] | None = None) -> None:
        """Persist the rollout row, some node entries and optionally an event, atomically."""
        row = _rollout_row(r)
        nodes = [_node_row(r.id, e) for e in entries]
        ev = (r.id, r.updated_at, event[0], orjson.dumps(event[1]).decode()) if event else None

        def op(c: sqlite3.Connection) -> None:
            c.execute(
                "UPDATE rollouts SET model=?, version=?, spec=?, state=?, wave=?, waves=?, "
                "paused_from=?, phase_started_at=?, baseline=?, cause=?, message=?, "
                "created_at=?, updated_at=?, finished_at=?, created_by=?, shadow=? WHERE id=?",
                (*row, r.id),
            )
            if nodes:
                c.executemany(
                    "INSERT OR REPLACE INTO rollout_nodes VALUES (?,?,?,?,?,?,?,?,?,?)", nodes
                )
            if ev is not None:
                c.execute("INSERT INTO rollout_events(rollout_id, ts, kind, detail) VALUES "
                          "(?,?,?,?)", ev)

        await self._run(op)

    async def load(self, *, active_only: bool = False, rid: int | None = None,
                   limit: int = 100) -> list[Rollout]:
        """Rollouts with their nodes, newest first."""
        def op(c: sqlite3.Connection) -> list[Rollout]:
            sql = ("SELECT id, spec, state, wave, waves, paused_from, phase_started_at, "
                   "baseline, cause, message, created_at, updated_at, finished_at, created_by, "
                   "shadow FROM rollouts")
            args: list[Any] = []
            if rid is not None:
                sql += " WHERE id=?"
                args.append(rid)
            elif active_only:
                sql += f" WHERE state IN ({','.join('?' * len(ACTIVE_STATES))})"
                args += sorted(ACTIVE_STATES)
            sql += " ORDER BY id DESC LIMIT ?"
            args.append(limit)
            out: list[Rollout] = []
            for row in c.execute(sql, args).fetchall():
                r = Rollout(
                    id=row[0], spec=RolloutSpec.model_validate_json(row[1]), state=row[2],
                    wave=row[3], waves=row[4], paused_from=row[5], phase_started_at=row[6],
                    baseline=orjson.loads(row[7]),
                    cause=orjson.loads(row[8]) if row[8] else None, message=row[9],
                    created_at=row[10], updated_at=row[11], finished_at=row[12],
                    created_by=row[13], shadow=orjson.loads(row[14]) if row[14] else None,
                )
                for n in c.execute(
                    "SELECT node, wave, status, prev_version, prev_recorded, generation, "
                    "applied_at, active_at, error FROM rollout_nodes WHERE rollout_id=?",
                    (r.id,),
                ):
                    r.nodes[n[0]] = NodeEntry(n[0], n[1], n[2], n[3], bool(n[4]), n[5], n[6],
                                              n[7], n[8])
                out.append(r)
            return out

        return await self._run(op)

    async def events(self, rid: int, limit: int = 50) -> list[dict[str, Any]]:
        """The latest events of a rollout, oldest first."""

        def op(c: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = c.execute(
                "SELECT ts, kind, detail FROM rollout_events WHERE rollout_id=? "
                "ORDER BY id DESC LIMIT ?", (rid, limit),
            ).fetchall()
            return [{"ts": r[0], "kind": r[1], **orjson.loads(r[2])} for r in reversed(rows)]

        return await self._run(op)
