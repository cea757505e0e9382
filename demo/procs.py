"""The demo's child processes: started in their own session, logged to files, stopped in order.

Every long-lived child (the broker, the hub, the agents) runs in a process session of its own, so
a Ctrl-C on the terminal reaches only the orchestrator, which then stops the children in a chosen
order: agents first (they drain their outboxes into a broker that is still up), then the hub,
then the broker. On Linux each child also gets a parent-death signal, so even a ``kill -9`` of the
orchestrator leaves no orphans. Short-lived command-line calls (``edge-hub models push`` …) run
the same way and are killed if the demo is interrupted while they run.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

#: ``prctl(PR_SET_PDEATHSIG, SIGTERM)``, resolved in the parent: the child, between fork and
#: exec, must not load libraries (the parent has threads by then).
_PR_SET_PDEATHSIG = 1
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


class DemoError(Exception):
    """A step of the demo failed; ``detail`` (a log tail) says why."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class Child:
    """One child process with its output in a log file."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path,
                 env: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Child:
        """Start it in its own session, tied to this process's life."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self.env, start_new_session=True, preexec_fn=_die_with_parent,  # noqa: PLW1509
            )
        return self

    @property
    def pid(self) -> int | None:
        """The process id, once started."""
        return None if self.proc is None else self.proc.pid

    def alive(self) -> bool:
        """Started and not exited."""
        return self.proc is not None and self.proc.poll() is None

    def returncode(self) -> int | None:
        """The exit status once it ended (negative: killed by that signal)."""
        return None if self.proc is None else self.proc.poll()

    def signal(self, sig: int) -> None:
        """Send ``sig`` to its whole process group (it leads it) while it is not reaped."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of its log."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        """Raise DemoError, with its log tail, when it has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise DemoError(f"{self.name} exited with status {self.proc.returncode} "
                            f"(log: {self.log_path})", self.log_tail())


def stop_all(children: Iterable[Child], timeout: float) -> dict[str, int | None]:
    """SIGTERM every child at once, wait up to ``timeout`` s, then SIGKILL the rest.

    Returns each child's exit status (None for one never started).
    """
    kids = [c for c in children if c.proc is not None]
    for c in kids:
        c.signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for c in kids:
        assert c.proc is not None
        try:
            c.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            c.signal(signal.SIGKILL)
            c.proc.wait(10)
    return {c.name: c.returncode() for c in kids}


def run_cli(argv: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float = 120.0,
            stop: Callable[[], bool] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command-line call to completion and capture its output.

    Interrupted (Ctrl-C, or ``stop()`` true) or past ``timeout``, the call is killed and the
    exception propagates, so no half-finished call outlives the demo.
    """
    proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(env) if env else None,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                out, err = proc.communicate(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if stop is not None and stop():
                    raise KeyboardInterrupt from None
                if time.monotonic() > deadline:
                    raise DemoError(f"{' '.join(argv[:4])} … took longer than {timeout:g} s") \
                        from None
    except BaseException:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)


def mosquitto() -> str:
    """Path of the mosquitto binary; DemoError saying how to install it when there is none."""
    exe = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).is_file()),
        None)
    if exe is None:
        raise DemoError(
            "mosquitto is not installed: run `bash scripts/setup.sh` (it installs the Debian "
            "package) or `apt-get install mosquitto`. The hub speaks MQTT 5, which the "
            "embedded Python brokers (amqtt: MQTT 3.1.1 only) do not.")
    return exe


def broker_child(conf: Path) -> Child:
    """A mosquitto with the config ``conf`` (``layout.broker_config``), logging beside it."""
    return Child("broker", [mosquitto(), "-c", str(conf)], conf.parent / "mosquitto.log")
