"""The data-access layer on a real SQLite file and a real PostgreSQL server: versioned
migrations (concurrent starts, a newer schema refused), and leadership with its fencing epoch."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from hub.config import ConfigError, StorageSettings, load_settings
from hub.registry.metadata import SqlMetadataStore
from hub.rollouts.store import DesiredRow, RolloutStore
from hub.storage.database import Database, Fenced, PostgresDatabase, enable_wal, open_database
from hub.storage.leader import LEADER_LOCK, PostgresLeadership
from hub.storage.migrations import SchemaTooNew
from tests.support.postgres import PostgresServer
from tests.support.waiting import until, wait_until


def storage(kind: str, tmp_path: Path, pg: PostgresServer | None) -> StorageSettings:
    if kind == "sqlite":
        return StorageSettings(data_dir=tmp_path / "data")
    assert pg is not None
    return StorageSettings(data_dir=tmp_path / "data", database_url=pg.new_database(),
                           database_password_file=pg.password_file(tmp_path),
                           leader_lease_s=1.0)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_settings(request: pytest.FixtureRequest, tmp_path: Path) -> StorageSettings:
    pg = request.getfixturevalue("postgres") if request.param == "postgresql" else None
    return storage(request.param, tmp_path, pg)


async def test_concurrent_starts_migrate_once(store_settings: StorageSettings) -> None:
    stores = [RolloutStore.from_settings(store_settings) for _ in range(4)]
    metas = [SqlMetadataStore.from_settings(store_settings) for _ in range(4)]
    try:
        await asyncio.gather(*(s.open() for s in stores), *(m.open() for m in metas))
        rows: set[tuple[str, int]] = set()
        for db in (stores[0].db, metas[0].db):  # one PostgreSQL database, or two SQLite files
            rows |= {(r[0], r[1]) for r in await db.run(lambda c: c.execute(
                "SELECT component, version FROM schema_migrations").fetchall())}
        assert rows == {("registry", 1), ("registry", 2), ("rollouts", 1), ("rollouts", 2),
                        ("rollouts", 3)}
        # every store works on the schema it made
        cid = await stores[1].enqueue("pause", 1, {}, "me")
        assert await stores[2].command_result(cid) == (False, None)
    finally:
        for s in stores:
            await s.close()
        for m in metas:
            await m.close()


async def test_a_schema_from_a_newer_hub_is_refused(store_settings: StorageSettings) -> None:
    store = RolloutStore.from_settings(store_settings)
    await store.open()
    await store.db.run(lambda c: c.execute(
        "INSERT INTO schema_migrations (component, version, applied_at) VALUES (?, ?, ?)",
        ("rollouts", 99, time.time())))
    await store.close()
    again = RolloutStore.from_settings(store_settings)
    try:
        with pytest.raises(SchemaTooNew, match="version 99, newer than this hub's 3"):
            await again.open()
    finally:
        await again.close()


async def test_a_bad_password_file_names_the_field(tmp_path: Path,
                                                   postgres: PostgresServer) -> None:
    pw = tmp_path / "pw"
    pw.write_text("x")
    pw.chmod(0o644)  # other users can read it
    s = StorageSettings(data_dir=tmp_path, database_url=postgres.new_database(),
                        database_password_file=pw)
    store = RolloutStore.from_settings(s)
    try:
        with pytest.raises(Exception, match=r"storage\.database_password_file"):
            await store.open()
    finally:
        await store.close()


def _leadership(db: Database, events: list[str], name: str) -> PostgresLeadership:
    assert isinstance(db, PostgresDatabase)

    def note(what: str) -> Callable[[], Awaitable[None]]:
        async def cb() -> None:
            events.append(f"{name}:{what}")
        return cb

    return PostgresLeadership(db, lease_s=1.0, on_elected=note("elected"),
                              on_lost=note("lost"), holder=name)


async def test_one_leader_and_an_ex_leaders_writes_are_fenced(tmp_path: Path,
                                                              postgres: PostgresServer) -> None:
    s = storage("postgresql", tmp_path, postgres)
    store_a, store_b = RolloutStore.from_settings(s), RolloutStore.from_settings(s)
    await store_a.open()
    await store_b.open()
    events: list[str] = []
    a = _leadership(store_a.db, events, "a")
    b = _leadership(store_b.db, events, "b")
    try:
        await a.start()
        await until(lambda: a.leading, timeout=10)
        await b.start()
        await asyncio.sleep(0)  # b tries at once; the lock is a's
        await until(lambda: events == ["a:elected"], timeout=5)
        assert not b.leading
        epoch_a = a.epoch
        assert epoch_a is not None
        await store_a.save_desired([DesiredRow("n1", 1, {}, "d1")])  # the leader writes
        with pytest.raises(Fenced):  # a follower may not
            await store_b.save_desired([DesiredRow("n1", 2, {}, "d2")])
        # a pauses: it keeps believing in its epoch, but its session is gone (as the server
        # ends it after a lease of silence), and b takes over with the next epoch
        await a.aclose()
        store_a.db.epoch = epoch_a
        await until(lambda: b.leading, timeout=5)
        assert b.epoch == epoch_a + 1 and events[-1] == "b:elected"
        with pytest.raises(Fenced, match="not the leader"):
            await store_a.save_desired([DesiredRow("n1", 3, {}, "d3")])
        await store_b.save_desired([DesiredRow("n1", 4, {}, "d4")])
        assert (await store_a.load_desired())["n1"].generation == 4
    finally:
        await b.aclose()
        await a.aclose()
        await store_a.close()
        await store_b.close()


async def test_a_silent_leader_stops_acting_and_loses_its_lock(
        tmp_path: Path, postgres: PostgresServer) -> None:
    """The server ends a leader's session after one lease without a word (a paused process),
    which frees the lock; the leader itself stops acting after half a lease without a
    heartbeat, before anyone else could lead."""
    s = storage("postgresql", tmp_path, postgres)
    db = open_database(s, "unused", label="t")
    assert isinstance(db, PostgresDatabase)
    now = [0.0]
    lead = PostgresLeadership(db, lease_s=1.0, on_elected=_noop, on_lost=_noop,
                              holder="solo", clock=lambda: now[0])
    probe = open_database(s, "unused", label="probe")
    assert isinstance(probe, PostgresDatabase)
    try:
        await lead.start()
        await until(lambda: lead.leading, timeout=10)
        assert lead.may_act()
        now[0] += 0.6  # more than half a lease without a successful heartbeat
        assert not lead.may_act()
        with pytest.raises(Fenced):
            lead.check()
        # the lock is held by one session, which the server will end when it goes silent
        held = await probe.run(lambda c: c.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND "
            "((classid::bigint << 32) | objid::bigint) = ?", (LEADER_LOCK,)).fetchone()[0])
        assert held == 1
    finally:
        await lead.aclose()
        await db.close()
        await probe.close()


async def _noop() -> None:
    return None


@pytest.mark.parametrize(("url", "why"), [
    ("postgresql://edge:s3cr3t-pw@db.local/edge", "holds a password"),
    ("postgresql://edge@db.local/edge?sslmode=require&password=s3cr3t-pw", "holds a password"),
    ("postgresql://edge@db.local", "needs a host and a database"),
    ("mysql://edge@db.local/edge", "should match pattern"),
])
def test_a_bad_database_url_names_the_field_and_never_echoes_a_password(url: str,
                                                                       why: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, storage={"database_url": url})
    ((field, message, value),) = info.value.errors
    assert field == "storage.database_url" and why in message.lower()
    assert "s3cr3t-pw" not in f"{message} {value} {info.value}"


def test_sqlite_waits_for_a_writer_to_switch_a_new_file_to_wal(tmp_path: Path) -> None:
    """SQLite refuses the switch to WAL at once, busy timeout or not, while another connection
    writes (as when the hub's stores open together and one migrates): the switch is retried
    until the writer commits, and gives up with the error after its timeout."""
    path = tmp_path / "hub.db"
    writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    writer.execute("CREATE TABLE t (a)")
    writer.execute("BEGIN IMMEDIATE")  # a write transaction in progress
    conn = sqlite3.connect(path, isolation_level=None, timeout=5, check_same_thread=False)
    tries: list[str] = []
    conn.set_trace_callback(lambda sql: tries.append(sql) if "journal_mode" in sql else None)
    done: list[BaseException | None] = []

    def switch() -> None:
        try:
            enable_wal(conn)
            done.append(None)
        except BaseException as exc:
            done.append(exc)

    thread = threading.Thread(target=switch)
    thread.start()
    try:
        wait_until(lambda: len(tries) >= 2 or bool(done), timeout=10,
                   what="a second try while the writer holds the file")
        assert not done, f"gave up at once: {done}"
    finally:
        writer.execute("COMMIT")
    thread.join(timeout=10)
    assert done == [None]
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()

    # a writer that never lets go: the error, after the timeout, not before
    other = tmp_path / "other.db"
    writer2 = sqlite3.connect(other, isolation_level=None)
    writer2.execute("CREATE TABLE t (a)")
    writer2.execute("BEGIN IMMEDIATE")
    late = sqlite3.connect(other, isolation_level=None, timeout=0.05)
    t0 = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        enable_wal(late, timeout_s=0.3)
    assert time.monotonic() - t0 >= 0.2
    writer2.execute("ROLLBACK")
    for c in (late, writer2, writer):
        c.close()
