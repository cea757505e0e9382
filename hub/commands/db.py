"""``edge-hub db migrate``: move a one-replica SQLite hub's state into PostgreSQL.

The way from the base (one hub, SQLite files on its volume) to replicas sharing a PostgreSQL
database (docs/deploy.md, "More than one hub (PostgreSQL)"). The work is
:mod:`hub.storage.copy`'s; this verb names the stores it copies (the registry's versions; the
rollouts with their nodes and events, the desired state, the forwarded commands), reads the
password from a file and prints a line per step.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path
from typing import Any

from edge_agent.common import cli
from edge_agent.common import settings as common_settings
from hub.registry import metadata
from hub.rollouts import store as rollout_store
from hub.storage import copy
from hub.storage.database import Database, PostgresDatabase

#: The environment variable the hub (and the K3s migration Job) names the password file in.
PASSWORD_ENV = "EDGE_HUB_STORAGE__DATABASE_PASSWORD_FILE"  # noqa: S105 - a variable's name


async def _registry_schema(db: Database) -> None:
    await metadata.SqlMetadataStore(db).open()


async def _rollouts_schema(db: Database) -> None:
    await rollout_store.RolloutStore(db).open()


#: What is copied, store by store, each table after those it references.
STORES = (
    copy.Store("registry", metadata.DB_FILE, ("model_versions",), metadata.SCHEMA_VERSION,
               _registry_schema),
    copy.Store("rollouts", rollout_store.DB_FILE,
               ("rollouts", "rollout_nodes", "rollout_events", "node_desired",
                "rollout_commands"),
               rollout_store.MIGRATIONS[-1].version, _rollouts_schema),
)

DESCRIPTION = """\
Copy a SQLite hub's state (the registry's model versions; rollouts with their nodes and
events; each node's desired state with its generation; forwarded rollout commands) into
an empty PostgreSQL database, keeping every id, then move the database's id sequences
past them: a hub started on that database continues where the SQLite hub stopped.

Use it once, when a one-replica hub on SQLite (the default) moves to PostgreSQL before
scaling out to several replicas (docs/deploy.md, "More than one hub (PostgreSQL)"). Stop
the hub first: the files are read as they are, and writes made during the copy are not
in it. The SQLite files are only read and stay as they were (the way back). Artifacts
are not in the database: they stay on the data folder, which every replica must then
mount (a ReadWriteMany volume; copy the folder's artifacts/ there first).

The target gets the hub's schema, then every row in one transaction, checked by counting
each table: on any error nothing is committed. A target whose tables already hold rows
is refused. The password comes from --password-file or the file named in
EDGE_HUB_STORAGE__DATABASE_PASSWORD_FILE (mode 0600), never from the command line. Exit
0 when copied (or, with --dry-run, when it would be), 1 with one line saying why not."""


def register(sub: Any) -> None:
    """Add the ``db`` verb group."""
    acts = cli.add_group(sub, "db", help="the hub's database: move a SQLite hub to PostgreSQL",
                         description="The hub's database (docs/deploy.md).")
    p = cli.add_verb(acts, "migrate", run,
                     help="copy a stopped SQLite hub's state into an empty PostgreSQL database",
                     description=DESCRIPTION)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--from", dest="source", required=True, metavar="sqlite:///DIR",
                   help="the SQLite hub's data folder (storage.data_dir), e.g. "
                   "sqlite:///var/lib/edge-hub")
    p.add_argument("--to", dest="target", required=True,
                   metavar="postgresql://USER@HOST:PORT/DB",
                   help="the PostgreSQL database (storage.database_url; no password in it)")
    p.add_argument("--password-file", type=Path, metavar="FILE",
                   help=f"file holding the database password (default: ${PASSWORD_ENV})")
    p.add_argument("--dry-run", action="store_true",
                   help="count what would be copied and check the target; write nothing")


def run(args: argparse.Namespace) -> int:
    """Copy (or with --dry-run, count); exit 0, or 1 with the reason."""
    folder = copy.source_folder(args.source)
    label = copy.target_label(args.target)
    password_file = args.password_file or _env_password_file()
    secret_files = _secret_policy()
    if password_file is not None:
        _check_password_file(password_file, secret_files)
    db = PostgresDatabase(args.target, password_file=password_file, secret_files=secret_files,
                          pool_size=1, label="migrate")
    print(f"edge-hub db migrate: {folder} (SQLite) -> {label}"
          f"{' (dry run: nothing is written)' if args.dry_run else ''}", flush=True)
    return asyncio.run(_run(db, folder, dry_run=args.dry_run))


async def _run(db: PostgresDatabase, folder: Path, *, dry_run: bool) -> int:
    started = time.monotonic()
    try:
        source = await asyncio.to_thread(copy.open_source, folder, STORES)
    except BaseException:
        await db.close()
        raise
    try:
        for name in source.missing:
            print(f"{name}: not in {folder} (that part of the hub never ran): nothing to copy")
        if dry_run:
            await copy.check_target(db, source)
            for t in source.tables:
                print(f"{t.name}: {t.rows} rows would be copied"
                      f"{'' if t.columns else ' (not in the source)'}")
            print(f"dry run: {source.rows} rows in {len(source.tables)} tables; the target "
                  "is reachable and holds no hub state")
            return 0
        next_ids = await copy.migrate(db, source, lambda line: print(line, flush=True))
    finally:
        await asyncio.to_thread(copy.close_source, source)
        await db.close()
    ids = ", ".join(f"{t} {n}" for t, n in next_ids.items())
    print(f"verified: {source.rows} rows in {len(source.tables)} tables, every count as in the "
          f"source; next ids: {ids}")
    print(f"done in {time.monotonic() - started:.1f} s: start the hubs with "
          "storage.database_url set to this database")
    return 0


def _env_password_file() -> Path | None:
    value = os.environ.get(PASSWORD_ENV, "").strip()
    return Path(value) if value else None


def _secret_policy() -> common_settings.SecretFilePolicy:
    """``secret_files`` as the hub reads it from its environment (``refuse`` unless set)."""
    return "warn" if os.environ.get("EDGE_HUB_SECRET_FILES", "").strip() == "warn" else "refuse"


def _check_password_file(path: Path, policy: common_settings.SecretFilePolicy) -> None:
    """A password file that cannot be read: one line naming it now, before anything starts."""
    try:
        common_settings.read_secret(path, policy)
    except OSError as exc:
        raise copy.CopyError(f"cannot read the password file {path}: "
                             f"{exc.strerror or exc}") from exc

