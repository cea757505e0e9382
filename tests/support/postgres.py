"""A real PostgreSQL server for tests: Debian's package, a throw-away cluster on a free port.

``PostgresServer.start()`` runs ``initdb`` (password authentication, SCRAM) into a fresh folder
and starts ``postgres`` listening on 127.0.0.1 only, no Unix socket. PostgreSQL refuses to run as
root, so as root both run as the ``postgres`` system user the package creates (or ``nobody``).
``new_database()`` makes an empty database per test (a template copy: milliseconds) and returns
its URL without the password, which tests hand the hub through ``storage.database_password_file``
as a deployment would. ``scripts/setup.sh`` installs the package.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

USER = "edgehub"


def _bin_dir() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    return found[-1].parent if found else None


def available() -> bool:
    """Whether the Debian package is installed."""
    return _bin_dir() is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _demote() -> tuple[int, int] | None:
    """(uid, gid) to run the server as when we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pw = pwd.getpwnam(name)
            return pw.pw_uid, pw.pw_gid
    raise RuntimeError("running as root and neither a postgres nor a nobody user exists")


class PostgresServer:
    """One cluster, started and stopped by the fixture."""

    def __init__(self) -> None:
        bin_dir = _bin_dir()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL is not installed (scripts/setup.sh installs it)")
        self.bin = bin_dir
        self.dir = Path(tempfile.mkdtemp(prefix="edge-pg-"))
        self.data = self.dir / "data"
        self.password = secrets.token_urlsafe(16)
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._ids = _demote()
        self._n = 0

    def _run_as(self) -> dict[str, object]:
        if self._ids is None:
            return {}
        uid, gid = self._ids
        return {"user": uid, "group": gid, "extra_groups": []}

    def start(self) -> PostgresServer:
        pwfile = self.dir / "pw"
        pwfile.write_text(self.password)
        if self._ids is not None:
            for p in (self.dir, pwfile):
                os.chown(p, *self._ids)
        os.chmod(self.dir, 0o700)
        subprocess.run(
            [str(self.bin / "initdb"), "-D", str(self.data), "-U", USER, "--pwfile", str(pwfile),
             "--auth", "scram-sha-256", "-E", "UTF8", "--no-sync", "--locale", "C"],
            check=True, capture_output=True, timeout=120, **self._run_as(),  # type: ignore[arg-type]
        )
        pwfile.unlink()
        with open(self.dir / "server.log", "ab") as log:  # the child keeps its own copy
            self.proc = subprocess.Popen(
                [str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port),
                 "-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories=",
                 "-c", "fsync=off", "-c", "synchronous_commit=off",
                 "-c", "full_page_writes=off", "-c", "max_connections=300",
                 "-c", "shared_buffers=64MB"],
                stdout=log, stderr=subprocess.STDOUT, **self._run_as(),  # type: ignore[arg-type]
            )
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 60.0) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited: {self.log_tail()}")
            try:
                psycopg.connect(self.url("postgres"), password=self.password,
                                connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def url(self, database: str) -> str:
        """The database's URL, without the password."""
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """An empty database; its URL."""
        import psycopg

        self._n += 1
        name = f"t{os.getpid()}_{self._n}_{secrets.token_hex(3)}"
        with psycopg.connect(self.url("postgres"), password=self.password,
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def password_file(self, folder: Path) -> Path:
        """The password in a file only its owner reads (``storage.database_password_file``)."""
        path = folder / "pg-password"
        path.write_text(self.password + "\n")
        path.chmod(0o600)
        return path

    def log_tail(self, n: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return (self.dir / "server.log").read_text(errors="replace")[-n:]
        return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # smart shutdown: waits for clients; fast is SIGINT
            self.proc.send_signal(2)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def running() -> Iterator[PostgresServer]:
    """A started server, stopped on exit."""
    server = PostgresServer()
    try:
        yield server.start()
    finally:
        server.stop()


# --------------------------------------------------------------- the suite on PostgreSQL
#: ``EDGE_TEST_DATABASE=postgresql`` runs every hub the tests build on PostgreSQL (a fresh
#: database each) instead of SQLite files: how CI runs the hub tests a second time.
ON_POSTGRES = os.environ.get("EDGE_TEST_DATABASE", "sqlite") == "postgresql"
_shared: dict[str, PostgresServer] = {}
_databases: dict[str, str] = {}


def shared_server() -> PostgresServer:
    """One server for the whole test process, started on first use, stopped at exit."""
    if "server" not in _shared:
        import atexit

        server = _shared["server"] = PostgresServer().start()
        atexit.register(server.stop)
    return _shared["server"]


def storage_for(data_dir: Path) -> dict[str, object]:
    """The hub's ``storage`` settings for a test hub on ``data_dir``: SQLite files there, or
    with ``EDGE_TEST_DATABASE=postgresql`` a PostgreSQL database of its own (one per
    ``data_dir``, as the SQLite files are; its password in a file beside ``data_dir``)."""
    out: dict[str, object] = {"data_dir": str(data_dir)}
    if ON_POSTGRES:
        server = shared_server()
        key = f"db:{Path(data_dir).resolve()}"
        if key not in _databases:
            _databases[key] = server.new_database()
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        out["database_url"] = _databases[key]
        out["database_password_file"] = str(server.password_file(data_dir.parent))
    return out


def hub_sql(storage: Any, db_file: str, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
    """Run one statement on a test hub's database behind its back (``storage``: the hub's
    ``StorageSettings``; ``db_file``: the SQLite file of that store) and commit; its rows."""
    if storage.database_url is None:
        conn = sqlite3.connect(Path(storage.data_dir) / db_file)
        try:
            cur = conn.execute(sql, args)
            rows = cur.fetchall()
            conn.commit()
            return rows
        finally:
            conn.close()
    import psycopg

    password = Path(storage.database_password_file).read_text().strip()
    with psycopg.connect(storage.database_url, password=password, autocommit=True) as pg:
        cur2 = pg.execute(sql.replace("?", "%s"), args)
        return cur2.fetchall() if cur2.description else []


def storage_env(data_dir: Path) -> dict[str, str]:
    """``storage_for`` as the environment of an ``edge-hub serve`` child (empty on SQLite)."""
    storage = storage_for(data_dir)
    return {f"EDGE_HUB_STORAGE__{k.upper()}": str(v) for k, v in storage.items()
            if k != "data_dir"}
