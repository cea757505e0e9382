"""The rollout side's state: rollouts, their nodes and events, desired state, forwarded commands.

It holds what must survive a ``kill -9`` of the hub (or of the leader among replicas): every
rollout with its state, plan, per-node progress (the version each node had before, recorded
before its label is touched) and its shadow phase's latest figures, an event log per rollout,
and per node the last desired state published with its ``generation`` (which only grows) and
whether the broker acknowledged it. With replicas it also carries the rollout commands a
follower received, for the leader to execute (``rollout_commands``).

The database is ``rollouts.sqlite3`` in ``storage.data_dir`` or the PostgreSQL database
(``hub.storage``). Every write the rollout controller and the dispatcher make is fenced: only
the current leader's are accepted.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from edge_agent.common.settings import SecretFilePolicy
from hub.config import StorageSettings
from hub.rollouts.model import ACTIVE_STATES, NodeEntry, Rollout, RolloutSpec
from hub.storage.database import Database, Tx, open_database
from hub.storage.migrations import Migration, migrate

DB_FILE = "rollouts.sqlite3"

MIGRATIONS = (
    Migration(1, """
CREATE TABLE IF NOT EXISTS rollouts (
  id {ID},
  model TEXT NOT NULL,
  version TEXT NOT NULL,
  spec TEXT NOT NULL,
  state TEXT NOT NULL,
  wave INTEGER NOT NULL,
  waves INTEGER NOT NULL,
  paused_from TEXT,
  phase_started_at {REAL} NOT NULL,
  baseline TEXT NOT NULL,
  cause TEXT,
  message TEXT NOT NULL DEFAULT '',
  created_at {REAL} NOT NULL,
  updated_at {REAL} NOT NULL,
  finished_at {REAL},
  created_by TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS rollouts_model ON rollouts(model, state);
CREATE TABLE IF NOT EXISTS rollout_nodes (
  rollout_id {BIGINT} NOT NULL REFERENCES rollouts(id),
  node TEXT NOT NULL,
  wave INTEGER NOT NULL,
  status TEXT NOT NULL,
  prev_version TEXT,
  prev_recorded INTEGER NOT NULL,
  generation {BIGINT} NOT NULL,
  applied_at {REAL},
  active_at {REAL},
  error TEXT,
  PRIMARY KEY (rollout_id, node)
);
CREATE TABLE IF NOT EXISTS rollout_events (
  id {ID},
  rollout_id {BIGINT} NOT NULL,
  ts {REAL} NOT NULL,
  kind TEXT NOT NULL,
  detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS rollout_events_rollout ON rollout_events(rollout_id, id);
CREATE TABLE IF NOT EXISTS node_desired (
  node TEXT PRIMARY KEY,
  generation {BIGINT} NOT NULL,
  models TEXT NOT NULL,
  digest TEXT NOT NULL,
  published INTEGER NOT NULL,
  updated_at {REAL} NOT NULL
)"""),
    Migration(2, "ALTER TABLE rollouts ADD COLUMN shadow TEXT"),
    Migration(3, """
CREATE TABLE IF NOT EXISTS rollout_commands (
  id {ID},
  kind TEXT NOT NULL,
  rollout_id {BIGINT},
  body TEXT NOT NULL,
  actor TEXT NOT NULL,
  created_at {REAL} NOT NULL,
  taken_at {REAL},
  done_at {REAL},
  result TEXT
)"""),
)
_COLS = ("model, version, spec, state, wave, waves, paused_from, phase_started_at, baseline, "
         "cause, message, created_at, updated_at, finished_at, created_by, shadow")
_NODE_COLS = ("rollout_id, node, wave, status, prev_version, prev_recorded, generation, "
              "applied_at, active_at, error")


def _legacy(tx: Tx) -> set[int]:
    """Versions a ``rollouts.sqlite3`` from before versioned migrations already has."""
    tables = {r[0] for r in tx.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if "rollouts" not in tables:
        return set()
    columns = {r[1] for r in tx.execute("PRAGMA table_info(rollouts)")}
    return {1, 2} if "shadow" in columns else {1}


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


def _node_row(rid: int, e: NodeEntry) -> tuple[Any, ...]:
    return (rid, e.node, e.wave, e.status, e.prev_version, int(e.prev_recorded), e.generation,
            e.applied_at, e.active_at, e.error)


@dataclass
class Command:
    """A rollout command a follower received, for the leader to execute."""

    id: int
    kind: str  # "create" or one of the controller's verbs
    rollout_id: int | None
    body: dict[str, Any]
    actor: str


class RolloutStore:
    """Async access to the rollout tables; leader-only writes are fenced."""

    def __init__(self, db: Database) -> None:
        self.db = db

    @classmethod
    def from_settings(cls, storage: StorageSettings,
                      secret_files: SecretFilePolicy = "refuse") -> RolloutStore:  # noqa: S107
        """The store on ``storage``'s database, through one connection: its reads then
        follow its writes in order (an API read after a step sees the step's event)."""
        return cls(open_database(storage, DB_FILE, label="rollouts",
                                 secret_files=secret_files, pool_size=1))

    async def open(self) -> None:
        """Create or migrate the schema."""
        await migrate(self.db, "rollouts", MIGRATIONS, legacy=_legacy)

    async def close(self) -> None:
        await self.db.close()

    # ------------------------------------------------------------------------------ desired
    async def load_desired(self) -> dict[str, DesiredRow]:
        def op(c: Tx) -> dict[str, DesiredRow]:
            rows = c.execute(
                "SELECT node, generation, models, digest, published FROM node_desired"
            ).fetchall()
            return {r[0]: DesiredRow(r[0], r[1], orjson.loads(r[2]), r[3], bool(r[4]))
                    for r in rows}

        return await self.db.run(op)

    async def save_desired(self, rows: Iterable[DesiredRow]) -> None:
        now = time.time()
        data = [(r.node, r.generation, orjson.dumps(r.models).decode(), r.digest,
                 int(r.published), now) for r in rows]

        def op(c: Tx) -> None:
            c.executemany(
                "INSERT INTO node_desired(node, generation, models, digest, published, "
                "updated_at) VALUES (?,?,?,?,?,?) ON CONFLICT(node) DO UPDATE SET "
                "generation=excluded.generation, models=excluded.models, "
                "digest=excluded.digest, published=excluded.published, "
                "updated_at=excluded.updated_at "
                "WHERE excluded.generation > node_desired.generation",
                data,
            )

        await self.db.run(op, fenced=True)

    async def mark_published(self, pairs: Iterable[tuple[str, int]]) -> None:
        data = list(pairs)

        def op(c: Tx) -> None:
            c.executemany(
                "UPDATE node_desired SET published=1 WHERE node=? AND generation=?", data
            )

        await self.db.run(op, fenced=True)

    # ----------------------------------------------------------------------------- rollouts
    async def create(self, r: Rollout) -> int:
        """Insert a rollout with its nodes; returns its id."""

        def op(c: Tx) -> int:
            rid = int(c.execute(
                f"INSERT INTO rollouts({_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) "  # noqa: S608
                "RETURNING id", _rollout_row(r),
            ).fetchone()[0])
            c.executemany(
                f"INSERT INTO rollout_nodes({_NODE_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?)",  # noqa: S608
                [_node_row(rid, e) for e in r.nodes.values()],
            )
            c.execute("INSERT INTO rollout_events(rollout_id, ts, kind, detail) VALUES "
                      "(?,?,?,?)", (rid, r.created_at, "created", "{}"))
            return rid

        return await self.db.run(op, fenced=True)

    async def save(self, r: Rollout, entries: Iterable[NodeEntry] = (),
                   event: tuple[str, dict[str, Any]] | None = None) -> None:
        """Persist the rollout row, some node entries and optionally an event, atomically."""
        row = _rollout_row(r)
        nodes = [_node_row(r.id, e) for e in entries]
        ev = (r.id, r.updated_at, event[0], orjson.dumps(event[1]).decode()) if event else None

        def op(c: Tx) -> None:
            c.execute(
                "UPDATE rollouts SET model=?, version=?, spec=?, state=?, wave=?, waves=?, "
                "paused_from=?, phase_started_at=?, baseline=?, cause=?, message=?, "
                "created_at=?, updated_at=?, finished_at=?, created_by=?, shadow=? WHERE id=?",
                (*row, r.id),
            )
            c.executemany(
                f"INSERT INTO rollout_nodes({_NODE_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?) "  # noqa: S608
                "ON CONFLICT (rollout_id, node) DO UPDATE SET wave=excluded.wave, "
                "status=excluded.status, prev_version=excluded.prev_version, "
                "prev_recorded=excluded.prev_recorded, generation=excluded.generation, "
                "applied_at=excluded.applied_at, active_at=excluded.active_at, "
                "error=excluded.error", nodes,
            )
            if ev is not None:
                c.execute("INSERT INTO rollout_events(rollout_id, ts, kind, detail) VALUES "
                          "(?,?,?,?)", ev)

        await self.db.run(op, fenced=True)

    async def load(self, *, active_only: bool = False, rid: int | None = None,
                   limit: int = 100) -> list[Rollout]:
        """Rollouts with their nodes, newest first."""
        def op(c: Tx) -> list[Rollout]:
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

        return await self.db.run(op)

    async def events(self, rid: int, limit: int = 50) -> list[dict[str, Any]]:
        """The latest events of a rollout, oldest first."""

        def op(c: Tx) -> list[dict[str, Any]]:
            rows = c.execute(
                "SELECT ts, kind, detail FROM rollout_events WHERE rollout_id=? "
                "ORDER BY id DESC LIMIT ?", (rid, limit),
            ).fetchall()
            return [{"ts": r[0], "kind": r[1], **orjson.loads(r[2])} for r in reversed(rows)]

        return await self.db.run(op)

    # ----------------------------------------------------------- commands from followers
    async def enqueue(self, kind: str, rollout_id: int | None, body: dict[str, Any],
                      actor: str) -> int:
        """Record a command for the leader (not fenced: any replica may); its id."""

        def op(c: Tx) -> int:
            return int(c.execute(
                "INSERT INTO rollout_commands(kind, rollout_id, body, actor, created_at) "
                "VALUES (?,?,?,?,?) RETURNING id",
                (kind, rollout_id, orjson.dumps(body).decode(), actor, time.time()),
            ).fetchone()[0])

        return await self.db.run(op)

    async def commands_waiting(self) -> bool:
        """Whether a command waits for the leader (a cheap read, not fenced)."""

        def op(c: Tx) -> bool:
            return c.execute("SELECT 1 FROM rollout_commands WHERE taken_at IS NULL AND "
                             "done_at IS NULL LIMIT 1").fetchone() is not None

        return await self.db.run(op)

    async def take_commands(self, limit: int = 20) -> list[Command]:
        """Claim the oldest waiting commands (the leader; fenced, so only it takes them)."""

        def op(c: Tx) -> list[Command]:
            rows = c.execute(
                "UPDATE rollout_commands SET taken_at=? WHERE id IN (SELECT id FROM "
                "rollout_commands WHERE taken_at IS NULL AND done_at IS NULL ORDER BY id "
                "LIMIT ?) RETURNING id, kind, rollout_id, body, actor", (time.time(), limit),
            ).fetchall()
            return sorted((Command(r[0], r[1], r[2], orjson.loads(r[3]), r[4]) for r in rows),
                          key=lambda cmd: cmd.id)

        return await self.db.run(op, fenced=True)

    async def finish_command(self, cid: int, result: dict[str, Any]) -> None:
        """The leader's answer to a command (``{"ok": ...}`` or ``{"error": ...}``)."""

        def op(c: Tx) -> None:
            c.execute("UPDATE rollout_commands SET done_at=?, result=? WHERE id=?",
                      (time.time(), orjson.dumps(result).decode(), cid))

        await self.db.run(op, fenced=True)

    async def command_result(self, cid: int) -> tuple[bool, dict[str, Any] | None]:
        """(taken by a leader, its answer or None while it runs)."""

        def op(c: Tx) -> tuple[bool, dict[str, Any] | None]:
            row = c.execute("SELECT taken_at, result FROM rollout_commands WHERE id=?",
                            (cid,)).fetchone()
            if row is None:
                return False, None
            return row[0] is not None, orjson.loads(row[1]) if row[1] else None

        return await self.db.run(op)

    async def withdraw(self, cid: int, result: dict[str, Any]) -> bool:
        """Close a command no leader took (answering ``result``); False when one took it."""

        def op(c: Tx) -> bool:
            cur = c.execute("UPDATE rollout_commands SET done_at=?, result=? WHERE id=? AND "
                            "taken_at IS NULL", (time.time(), orjson.dumps(result).decode(),
                                                 cid))
            return cur.rowcount > 0

        return await self.db.run(op)
