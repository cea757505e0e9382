"""Helpers for the outbox fault tests: the forking driver process and its event stream."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[2]


class Zygote:
    """``python -m tests.support.outbox_driver zygote``: forks drivers, collects their JSON
    lines."""

    def __init__(self, stderr: Path) -> None:
        self.stderr_path = stderr
        self._stderr = stderr.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.outbox_driver", "zygote"],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
            text=True, bufsize=1,
        )
        self.bad_lines: list[str] = []
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                try:
                    self.events.append(orjson.loads(line))
                except orjson.JSONDecodeError:
                    self.bad_lines.append(line)
                self._cond.notify_all()

    def spawn(self, argv: list[str], timeout: float = 20.0) -> int:
        """Fork one driver with ``argv``; return its pid once it said ready."""
        assert self.proc.stdin is not None
        with self._cond:
            seen = len(self.events)
        self.proc.stdin.write(orjson.dumps(argv).decode() + "\n")
        self.proc.stdin.flush()
        ev = self.wait(lambda e: e.get("ready") is True, timeout, start=seen)
        return int(ev["pid"])

    def wait(self, match: Callable[[dict[str, Any]], bool], timeout: float,
             start: int = 0, count: int = 1) -> dict[str, Any]:
        """Wait for the ``count``-th event from index ``start`` on that ``match``es."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                hits = [e for e in self.events[start:] if match(e)]
                if len(hits) >= count:
                    return hits[count - 1]
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(
                        f"no matching driver event within {timeout}s; zygote exit "
                        f"{self.proc.poll()}, bad lines {self.bad_lines[-3:]}, stderr: "
                        f"{self.stderr_path.read_text(errors='replace')[-2000:]}")
                self._cond.wait(min(left, 0.2))

    def snapshot(self) -> list[dict[str, Any]]:
        """All events so far."""
        with self._cond:
            return list(self.events)

    def close(self, child: int | None = None) -> None:
        """Stop a running child (SIGTERM) and the zygote."""
        if child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._reader.join(15)
        if self._reader.is_alive() and child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
            self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()
