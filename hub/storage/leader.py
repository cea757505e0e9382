"""Which hub process leads: runs the rollout controller and the desired-state dispatch.

With SQLite there is one process, and it leads from the start (``SoleLeader``).

With PostgreSQL every replica runs a ``PostgresLeadership``: a dedicated session that tries
``pg_try_advisory_lock`` every quarter lease. The one that gets the lock increments the epoch in
``hub_leader`` (waiting for any fenced write of the previous leader to end: those hold a share
lock on that row) and leads with it; every leader-only write checks it (``Database.check_fence``).
The leader proves it is alive by a heartbeat on the same session every quarter lease, and
the session is opened with ``idle_session_timeout`` = the lease, so a leader that stops
answering (``SIGSTOP``, a frozen VM, a cut network) loses its session, and with it the lock,
after one lease; a leader killed outright loses it at once (its socket closes). Its pool
connections carry ``idle_in_transaction_session_timeout`` = the lease, so a write it left
open cannot hold the successor's epoch increment for longer than that.

An ex-leader that wakes up is stopped twice before it acts: ``may_act`` is false once half a
lease passed without a successful heartbeat (checked before every label patch and desired
message), and its fenced writes are refused because the epoch moved on. The heartbeat then
fails or reads another epoch, and it steps down (``on_lost``) and follows.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import structlog

from hub.storage.database import Database, Fenced, PostgresDatabase
from hub.storage.migrations import Migration, migrate

log = structlog.get_logger(__name__)

#: ``pg_try_advisory_lock`` key of leadership ("EDGELEAD").
LEADER_LOCK = 0x45444745_4C454144
MIGRATIONS = (Migration(1, """
CREATE TABLE IF NOT EXISTS hub_leader (
  id INTEGER PRIMARY KEY,
  epoch {BIGINT} NOT NULL,
  holder TEXT NOT NULL,
  since {REAL} NOT NULL
);
INSERT INTO hub_leader (id, epoch, holder, since) VALUES (1, 0, '', 0) ON CONFLICT (id) DO NOTHING
"""),)

Callback = Callable[[], Awaitable[None]]


def holder_name() -> str:
    """This process as ``hub_leader.holder`` shows it: host (the pod's name) and pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Leadership:
    """Leads or follows; ``on_elected`` and ``on_lost`` switch the leader-only parts."""

    def __init__(self, on_elected: Callback, on_lost: Callback) -> None:
        self._on_elected = on_elected
        self._on_lost = on_lost
        self.epoch: int | None = None
        #: Times this process became leader, and stepped down.
        self.elected = 0
        self.lost = 0

    @property
    def leading(self) -> bool:
        """Whether this process leads now."""
        return self.epoch is not None

    def may_act(self) -> bool:
        """Whether a leader-only action (a label patch, a desired message) may go out now."""
        return self.leading

    def check(self) -> None:
        """Raise ``Fenced`` unless ``may_act``."""
        if not self.may_act():
            raise Fenced("this hub is not the leader (or has not heard from the database "
                         "within half its lease): the action was not taken")

    async def start(self) -> None:
        """Begin leading or trying to."""
        raise NotImplementedError

    async def aclose(self) -> None:
        """Stop; a leader steps down (``on_lost`` runs)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """For ``/readyz`` and ``/metrics``."""
        return {"leader": self.leading, "epoch": self.epoch}


class SoleLeader(Leadership):
    """The only hub process (SQLite): leads from ``start`` to ``aclose``."""

    async def start(self) -> None:
        self.epoch = 0
        self.elected += 1
        await self._on_elected()

    async def aclose(self) -> None:
        if self.epoch is not None:
            self.epoch = None
            await self._on_lost()


class PostgresLeadership(Leadership):
    """Leadership by an advisory lock held by one session, with an epoch for fencing."""

    def __init__(self, db: PostgresDatabase, *, lease_s: float, on_elected: Callback,
                 on_lost: Callback, holder: str | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(on_elected, on_lost)
        self.db = db
        self.lease_s = lease_s
        self.holder = holder or holder_name()
        self._clock = clock
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-leader")
        self._conn: Any = None
        self._last_ok = float("-inf")
        self._task: asyncio.Task[None] | None = None
        self._starting: asyncio.Task[None] | None = None
        self._switch = asyncio.Lock()
        self._closed = False

    def may_act(self) -> bool:
        return self.leading and self._clock() - self._last_ok < self.lease_s / 2

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "holder": self.holder,
                "heartbeat_age_s": (round(self._clock() - self._last_ok, 3)
                                    if self.leading else None)}

    async def start(self) -> None:
        await migrate(self.db, "leader", MIGRATIONS)
        self._task = asyncio.create_task(self._run(), name="hub-leadership")

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._step_down("shutdown")
        await asyncio.get_running_loop().run_in_executor(self._thread, self._drop)
        self._thread.shutdown(wait=False)

    # -------------------------------------------------------------------------- the loop
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                if self.epoch is None:
                    epoch = await loop.run_in_executor(self._thread, self._try_acquire)
                    if epoch is not None:
                        await self._become_leader(epoch)
                else:
                    ok = await loop.run_in_executor(self._thread, self._heartbeat)
                    if not ok:
                        await self._step_down("another replica leads")
                    elif not self.may_act():
                        await self._step_down("heartbeat older than half the lease")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database is away: a leader steps down
                log.warning("leadership_check_failed", error=str(exc)[:200],
                            leading=self.leading)
                await loop.run_in_executor(self._thread, self._drop)
                await self._step_down("database unreachable")
            await asyncio.sleep(self.lease_s / 4)

    async def _become_leader(self, epoch: int) -> None:
        async with self._switch:
            self.epoch = epoch
            self.db.epoch = epoch
            self.elected += 1
            log.info("leadership_acquired", epoch=epoch, holder=self.holder)
            # the leader's parts start beside the heartbeat, which must not wait for them
            self._starting = asyncio.create_task(self._start_parts(epoch), name="hub-lead")

    async def _start_parts(self, epoch: int) -> None:
        try:
            await self._on_elected()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("leadership_start_failed", epoch=epoch)
            await self._step_down("the leader's parts failed to start")

    async def _step_down(self, why: str) -> None:
        async with self._switch:
            await self._lose(why)

    async def _lose(self, why: str) -> None:
        if self.epoch is None:
            return
        log.warning("leadership_lost", epoch=self.epoch, reason=why, holder=self.holder)
        self.epoch = None  # no label patch or desired message from here on
        self.lost += 1
        starting, self._starting = self._starting, None
        if starting is not None and not starting.done() and starting is not asyncio.current_task():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await starting
        try:
            # the parts' last writes (acknowledgements) still carry the epoch: accepted when
            # this is a shutdown, refused by the database when a successor took over
            await self._on_lost()
        finally:
            self.db.epoch = None
            # give the lock back (a session that is still alive would keep it)
            await asyncio.get_running_loop().run_in_executor(self._thread, self._drop)

    # ------------------------------------------------------------ blocking, on the thread
    def _session(self) -> Any:
        if self._conn is None or self._conn.closed:
            conn = self.db.connect()
            ms = int(self.lease_s * 1000)
            conn.execute(f"SET idle_session_timeout = {ms}")
            conn.execute(f"SET idle_in_transaction_session_timeout = {ms}")
            self._conn = conn
        return self._conn

    def _try_acquire(self) -> int | None:
        conn = self._session()
        got = conn.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK,)).fetchone()[0]
        if not got:
            return None
        with conn.transaction():
            row = conn.execute(
                "UPDATE hub_leader SET epoch = epoch + 1, holder = %s, since = %s WHERE id = 1 "
                "RETURNING epoch", (self.holder, time.time()),
            ).fetchone()
        self._last_ok = self._clock()
        return int(row[0])

    def _heartbeat(self) -> bool:
        started = self._clock()
        row = self._session().execute("SELECT epoch FROM hub_leader WHERE id = 1").fetchone()
        if row is None or int(row[0]) != self.epoch:
            return False
        self._last_ok = started
        return True

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()


def make_leadership(db: Database, *, lease_s: float, on_elected: Callback,
                    on_lost: Callback) -> Leadership:
    """PostgreSQL: elected among the replicas; SQLite: the sole process leads."""
    if isinstance(db, PostgresDatabase):
        return PostgresLeadership(db, lease_s=lease_s, on_elected=on_elected, on_lost=on_lost)
    return SoleLeader(on_elected, on_lost)
