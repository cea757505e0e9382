"""``edge-hub db migrate``: a real hub on SQLite (versions pushed, a rollout run through the
control plane with a real broker, simulated agents and the fake Kubernetes API) copied into a
real PostgreSQL server; every row arrives, a hub on PostgreSQL continues from it, and a second
copy, a dry run and bad inputs change nothing."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from hub.cli import main
from hub.config import StorageSettings
from hub.registry.metadata import DB_FILE as REGISTRY_FILE
from hub.registry.metadata import ModelVersion, SqlMetadataStore
from hub.registry.service import Registry
from hub.rollouts.model import RolloutSpec
from hub.rollouts.store import DB_FILE as ROLLOUTS_FILE
from hub.rollouts.store import DesiredRow, RolloutStore
from tests.support.broker import Broker
from tests.support.fake_k8s import FakeKube
from tests.support.inproc import Result, run_main
from tests.support.postgres import PostgresServer
from tests.support.rollout_env import (
    MODEL,
    Fleet,
    add_camera_nodes,
    control_plane,
    hub_settings,
    push_version,
)
from tests.support.waiting import until

TABLES = {REGISTRY_FILE: ["model_versions"],
          ROLLOUTS_FILE: ["rollouts", "rollout_nodes", "rollout_events", "node_desired",
                          "rollout_commands"]}
NODES = [f"cam-{i}" for i in range(4)]
#: A hub on SQLite files, whatever EDGE_TEST_DATABASE says (the source of a migration).
ON_SQLITE: dict[str, Any] = {"database_url": None, "database_password_file": None}


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    k = FakeKube(hang_s=10).start()
    yield k
    k.stop()


@pytest.fixture
def fleet(broker: Broker, topic_prefix: str) -> Iterator[Fleet]:
    f = Fleet(broker, topic_prefix)
    yield f
    f.stop()


def migrate_cli(*args: str, env: dict[str, str] | None = None) -> Result:
    """``edge-hub db migrate ARGS`` in this process, with no other EDGE_HUB_* variable."""
    return run_main(main, ["db", "migrate", *args], env=env, clear_prefix="EDGE_HUB_")


def sqlite_rows(data_dir: Path) -> dict[str, tuple[list[str], list[tuple[Any, ...]]]]:
    """Every table's columns and rows (sorted) in the hub's SQLite files."""
    out = {}
    for file, tables in TABLES.items():
        conn = sqlite3.connect(data_dir / file)
        try:
            for t in tables:
                cols = [r[1] for r in conn.execute(f"PRAGMA table_info({t})")]
                rows = conn.execute(f"SELECT {', '.join(cols)} FROM {t}").fetchall()
                out[t] = (cols, sorted(rows, key=repr))
        finally:
            conn.close()
    return out


def pg_rows(url: str, password: str,
            columns: dict[str, list[str]]) -> dict[str, list[tuple[Any, ...]]]:
    """The same columns' rows (sorted) in the PostgreSQL database."""
    with psycopg.connect(url, password=password) as conn:
        return {t: sorted((tuple(r) for r in conn.execute(
            f"SELECT {', '.join(cols)} FROM {t}").fetchall()), key=repr)
            for t, cols in columns.items()}


def pg_tables(url: str, password: str) -> set[str]:
    with psycopg.connect(url, password=password) as conn:
        return {r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")}


def spec(version: str) -> RolloutSpec:
    return RolloutSpec.model_validate({
        "model": MODEL, "version": version, "selector": "site=a", "canary": 1,
        "waves": [50, 100], "bake_s": 0.3, "gates": ["error_rate<=0.01"], "deadline_s": 10,
        "min_samples": 2})


async def test_a_sqlite_hub_moves_to_postgresql_and_continues(
    tmp_path: Path, broker: Broker, topic_prefix: str, kube: FakeKube, fleet: Fleet,
    models_dir: Path, postgres: PostgresServer,
) -> None:
    data = tmp_path / "data"
    kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
    add_camera_nodes(kube, NODES, site="a")
    for n in NODES:
        fleet.add(n)
    # ---- the hub on SQLite: two versions, a rollout with its events, a forwarded command
    on_sqlite = hub_settings(data, broker=broker, prefix=topic_prefix, kubeconfig=kubeconfig,
                             storage=ON_SQLITE)
    reg = Registry(on_sqlite)
    for v in ("1.0", "2.0"):
        await push_version(reg, models_dir, v)
    cp = await control_plane(on_sqlite, reg)
    try:
        await until(lambda: all(cp.fleet.online(n) for n in NODES))
        rid = (await cp.controller.create(spec("2.0")))["id"]
        await until(lambda: cp.controller.rollouts[rid].state == "succeeded", 30)
        await until(lambda: cp.dispatcher.all_published(NODES))
    finally:
        await cp.aclose()
        await reg.aclose()
    store = RolloutStore.from_settings(on_sqlite.storage)
    await store.open()
    cid = await store.enqueue("pause", rid, {"why": "test"}, "ci")
    assert [c.id for c in await store.take_commands()] == [cid]
    await store.finish_command(cid, {"ok": True})
    await store.close()
    before = sqlite_rows(data)
    assert {t: len(rows) for t, (_, rows) in before.items() if not rows} == {}
    desired_before = {r[0]: r[1] for r in before["node_desired"][1]}
    max_event = max(r[0] for r in before["rollout_events"][1])

    # ---- the migration
    url, pw = postgres.new_database(), postgres.password_file(tmp_path)
    res = await asyncio.to_thread(migrate_cli, "--from", f"sqlite://{data}", "--to", url,
                                  "--password-file", str(pw))
    assert res.returncode == 0, res.stderr
    for t, (_, rows) in before.items():
        assert f"{t}: {len(rows)} rows copied" in res.stdout
    assert "verified:" in res.stdout and postgres.password not in res.stdout + res.stderr
    columns = {t: cols for t, (cols, _) in before.items()}
    copied = pg_rows(url, postgres.password, columns)
    assert copied == {t: rows for t, (_, rows) in before.items()}  # every row, every byte
    assert sqlite_rows(data) == before  # the source is as it was

    # ---- a second migration into the (now full) target is refused and changes nothing
    again = await asyncio.to_thread(migrate_cli, "--from", f"sqlite://{data}", "--to", url,
                                    "--password-file", str(pw))
    assert again.returncode == 1
    assert "already holds hub state" in again.stderr and "model_versions 2" in again.stderr
    assert pg_rows(url, postgres.password, columns) == copied

    # ---- a hub on PostgreSQL continues: the stores read it all, new ids and generations grow
    on_pg = hub_settings(data, broker=broker, prefix=topic_prefix, kubeconfig=kubeconfig,
                         storage={"database_url": url, "database_password_file": str(pw)})
    reg = Registry(on_pg)
    got = await reg.get(MODEL, "2.0")
    assert got is not None
    assert got.manifest_bytes == next(r for r in before["model_versions"][1]
                                      if r[1] == "2.0")[columns["model_versions"].index("manifest")]
    await push_version(reg, models_dir, "3.0")  # the artifacts stayed on the data folder
    cp = await control_plane(on_pg, reg)
    try:
        old = (await cp.store.load(rid=rid))[0]
        assert old.state == "succeeded" and set(old.nodes) == set(NODES)
        assert [e["kind"] for e in await cp.store.events(rid)][-1] == "succeeded"
        assert await cp.store.command_result(cid) == (True, {"ok": True})
        await until(lambda: all(cp.fleet.online(n) for n in NODES))
        rid2 = (await cp.controller.create(spec("3.0")))["id"]
        assert rid2 > rid
        await until(lambda: cp.controller.rollouts[rid2].state == "succeeded", 30)
        assert all(fleet.agents[n].active_version(MODEL) == "3.0" for n in NODES)
        await until(lambda: cp.dispatcher.all_published(NODES))
        desired = await cp.store.load_desired()
        assert all(desired[n].generation > desired_before[n] for n in NODES), desired
        assert all(fleet.agents[n].desired_log[-1][0] == desired[n].generation
                   for n in NODES)
        with psycopg.connect(url, password=postgres.password) as conn:
            first = conn.execute("SELECT MIN(id) FROM rollout_events WHERE rollout_id = %s",
                                 (rid2,)).fetchone()
        assert first is not None and first[0] > max_event
        assert await cp.store.enqueue("pause", rid2, {}, "ci") > cid
    finally:
        await cp.aclose()
        await reg.aclose()


async def _small_hub(data: Path, *, rollouts: bool) -> None:
    """A SQLite hub's files written through the stores: one version, and with ``rollouts``
    two nodes' desired state."""
    storage = StorageSettings(data_dir=data)
    meta = SqlMetadataStore.from_settings(storage)
    await meta.open()
    await meta.insert(ModelVersion(
        name="det", version="1.0", task="detect", sha256="a" * 64, size=3,
        manifest_sha256="b" * 64, manifest_bytes=b'{"name": "det"}', signature=None,
        created_at=time.time(), pushed_by="ci", notes="", quantization={"method": "x"}))
    await meta.close()
    if rollouts:
        store = RolloutStore.from_settings(storage)
        await store.open()
        await store.save_desired([DesiredRow("n1", 7, {"det": {"version": "1.0"}}, "d1"),
                                  DesiredRow("n2", 3, {}, "d2", published=True)])
        await store.close()


async def test_dry_run_writes_nothing_and_the_password_comes_from_the_environment(
    tmp_path: Path, postgres: PostgresServer,
) -> None:
    data = tmp_path / "data"
    await _small_hub(data, rollouts=False)  # a hub whose rollouts never ran: no rollouts file
    url, pw = postgres.new_database(), postgres.password_file(tmp_path)
    env = {"EDGE_HUB_STORAGE__DATABASE_PASSWORD_FILE": str(pw)}
    dry = await asyncio.to_thread(migrate_cli, "--from", f"sqlite://{data}", "--to", url,
                                  "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert "model_versions: 1 rows would be copied" in dry.stdout
    assert "rollouts.sqlite3: not in" in dry.stdout
    assert pg_tables(url, postgres.password) == set()  # not even the schema
    res = await asyncio.to_thread(migrate_cli, "--from", f"sqlite://{data}", "--to", url,
                                  env=env)
    assert res.returncode == 0, res.stderr
    assert "model_versions: 1 rows copied" in res.stdout
    assert "rollouts: not in the source" in res.stdout
    assert postgres.password not in res.stdout + res.stderr
    storage = StorageSettings(data_dir=tmp_path / "elsewhere", database_url=url,
                              database_password_file=pw)
    meta = SqlMetadataStore.from_settings(storage)
    store = RolloutStore.from_settings(storage)
    try:
        await meta.open()
        await store.open()
        [v] = await meta.list()
        assert (v.name, v.version, v.manifest_bytes, v.quantization) == (
            "det", "1.0", b'{"name": "det"}', {"method": "x"})
        assert await store.load_desired() == {}
        assert await store.enqueue("pause", None, {}, "ci") == 1
    finally:
        await meta.close()
        await store.close()
    # a dry run against a target that holds state says so
    dry = await asyncio.to_thread(migrate_cli, "--from", f"sqlite://{data}", "--to", url,
                                  "--dry-run", env=env)
    assert dry.returncode == 1 and "already holds hub state" in dry.stderr


def _newer_schema(data: Path) -> None:
    conn = sqlite3.connect(data / ROLLOUTS_FILE)
    conn.execute("INSERT INTO schema_migrations VALUES ('rollouts', 99, 0)")
    conn.commit()
    conn.close()


def _arrange(case: str, tmp: Path, data: Path, pw: Path) -> tuple[str, str, Path]:
    """``--from``, ``--to`` and the password file of a bad-input case (its files spoilt)."""
    (tmp / "empty").mkdir()
    sources = {"no-folder": f"sqlite://{tmp / 'nope'}",
               "a-file": f"sqlite://{data / REGISTRY_FILE}",
               "not-sqlite-url": str(data),
               "empty-folder": f"sqlite://{tmp / 'empty'}"}
    targets = {"mysql": "mysql://edgehub@127.0.0.1:3306/hub",
               "password-in-url": "postgresql://edgehub:not-the-password-123@127.0.0.1:1/hub"}
    if case == "not-a-database":
        (data / REGISTRY_FILE).write_bytes(b"not a database " * 100)
    elif case == "newer-schema":
        _newer_schema(data)
    elif case == "no-password-file":
        pw = tmp / "missing"
    elif case == "exposed-password-file":
        pw.chmod(0o644)
    return (sources.get(case, f"sqlite://{data}"),
            targets.get(case, "postgresql://edgehub@127.0.0.1:1/hub"), pw)


@pytest.mark.parametrize(("case", "reason"), [
    ("no-folder", "does not exist"),
    ("a-file", "is not a folder"),
    ("not-sqlite-url", "--from must be sqlite:///"),
    ("empty-folder", "holds no hub state"),
    ("not-a-database", "cannot read"),
    ("newer-schema", "newer than this edge-hub's 3"),
    ("mysql", "--to must be postgresql://"),
    ("password-in-url", "--to holds a password"),
    ("no-password-file", "cannot read the password file"),
    ("exposed-password-file", "readable by other users"),
    ("unreachable", "cannot connect to PostgreSQL"),
])
async def test_bad_inputs_exit_1_with_the_reason(tmp_path: Path, case: str,
                                                reason: str) -> None:
    data = tmp_path / "data"
    await _small_hub(data, rollouts=True)
    pw = tmp_path / "pw"
    pw.write_text("not-the-password-123\n")
    pw.chmod(0o600)
    source, target, pw = _arrange(case, tmp_path, data, pw)
    before = sqlite_rows(data) if case in ("newer-schema", "unreachable") else None
    res = await asyncio.to_thread(migrate_cli, "--from", source, "--to", target,
                                  "--password-file", str(pw))
    assert res.returncode == 1, res
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edge-hub: error: "), res.stderr
    assert reason in lines[0]
    assert "not-the-password-123" not in res.stdout + res.stderr
    if before is not None:
        assert sqlite_rows(data) == before


async def test_a_row_the_target_refuses_rolls_the_whole_copy_back(
    tmp_path: Path, postgres: PostgresServer,
) -> None:
    data = tmp_path / "data"
    await _small_hub(data, rollouts=True)
    conn = sqlite3.connect(data / REGISTRY_FILE)  # PostgreSQL's text cannot hold a NUL
    conn.execute("UPDATE model_versions SET notes = 'a' || char(0) || 'b'")
    conn.commit()
    conn.close()
    url, pw = postgres.new_database(), postgres.password_file(tmp_path)
    args = ("--from", f"sqlite://{data}", "--to", url, "--password-file", str(pw))
    res = await asyncio.to_thread(migrate_cli, *args)
    assert res.returncode == 1
    assert "model_versions:" in res.stderr and "nothing was committed" in res.stderr
    columns = {t: ["*"] for t in ("model_versions", "node_desired")}
    assert pg_rows(url, postgres.password, columns) == {"model_versions": [],
                                                        "node_desired": []}
    # the schema stays, empty: once the row is fixed, the same command goes through
    conn = sqlite3.connect(data / REGISTRY_FILE)
    conn.execute("UPDATE model_versions SET notes = 'ab'")
    conn.commit()
    conn.close()
    res = await asyncio.to_thread(migrate_cli, *args)
    assert res.returncode == 0, res.stderr
    assert "node_desired: 2 rows copied" in res.stdout


def test_help_says_when_and_how() -> None:
    res = run_main(main, ["db", "migrate", "--help"])
    text = " ".join(res.stdout.split())
    assert res.returncode == 0
    for words in ("before scaling out", "Stop the hub first", "stay on the data folder",
                  "never from the command line", "--dry-run"):
        assert words in text, words
