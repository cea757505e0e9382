"""Helpers for the outbox fault tests: the forking driver process and its event stream, an
independent ledger of what a subscriber received, and a look into the outbox file."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
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

    def wait_for(self, pid: int, key: str, timeout: float, *, start: int = 0,
                 count: int = 1) -> dict[str, Any]:
        """Wait for driver ``pid``'s ``count``-th event carrying ``key`` (from index ``start``)."""
        def match(e: dict[str, Any]) -> bool:
            return e.get("pid") == pid and key in e
        return self.wait(match, timeout, start=start, count=count)

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


@dataclass
class Ledger:
    """What a subscriber received, judged on its own (none of the agent's or the hub's code).

    Built from the raw payloads in arrival order. A camera's seqs fall into series: a series
    begins at the ``first`` of a ``seq_reset`` marker (or at the lowest seq seen before any
    marker), and a seq belongs to the latest series that began at or below it (a new series
    starts at the wall clock in microseconds, above everything before it).
    """

    #: Every arrival: (camera, seq, payload).
    arrivals: list[tuple[str, int, bytes]] = field(default_factory=list)
    #: Per camera, the ``first`` of every reset marker seen, in arrival order (repeats kept).
    markers: dict[str, list[tuple[int, str]]] = field(default_factory=lambda: defaultdict(list))

    @classmethod
    def of(cls, payloads: Iterable[bytes]) -> Ledger:
        """The ledger of these result payloads, in arrival order."""
        led = cls()
        for raw in payloads:
            obj = orjson.loads(raw)
            cam, seq = str(obj["camera"]), int(obj["seq"])
            led.arrivals.append((cam, seq, raw))
            mark = obj.get("seq_reset")
            if mark is not None:
                led.markers[cam].append((int(mark["first"]), str(mark["reason"])))
        return led

    def cameras(self) -> list[str]:
        """The cameras seen."""
        return sorted({c for c, _, _ in self.arrivals})

    def seqs(self, cam: str) -> set[int]:
        """The distinct seqs of ``cam`` received."""
        return {s for c, s, _ in self.arrivals if c == cam}

    def received(self) -> set[tuple[str, int]]:
        """Every distinct (camera, seq) received."""
        return {(c, s) for c, s, _ in self.arrivals}

    def duplicates(self) -> int:
        """Arrivals beyond the first of their (camera, seq)."""
        return len(self.arrivals) - len(self.received())

    def reused(self) -> list[tuple[str, int]]:
        """(camera, seq) received with two different payloads: a seq given twice."""
        seen: dict[tuple[str, int], bytes] = {}
        bad = []
        for c, s, p in self.arrivals:
            if seen.setdefault((c, s), p) != p:
                bad.append((c, s))
        return bad

    def out_of_order(self) -> list[tuple[str, int, int]]:
        """First arrivals whose seq is below an earlier first arrival of the same camera."""
        high: dict[str, int] = {}
        seen: set[tuple[str, int]] = set()
        bad = []
        for c, s, _ in self.arrivals:
            if (c, s) in seen:
                continue
            seen.add((c, s))
            if s < high.get(c, -1):
                bad.append((c, s, high[c]))
            high[c] = max(high.get(c, -1), s)
        return bad

    def series(self, cam: str) -> list[tuple[int, int]]:
        """``cam``'s series as (first, highest seq received)."""
        seqs = sorted(self.seqs(cam))
        starts = sorted({f for f, _ in self.markers.get(cam, [])})
        if not starts or seqs[0] < starts[0]:
            starts.insert(0, seqs[0])  # a series whose marker came before we listened
        out = []
        for i, first in enumerate(starts):
            end = starts[i + 1] if i + 1 < len(starts) else None
            inside = [s for s in seqs if s >= first and (end is None or s < end)]
            out.append((first, max(inside) if inside else first - 1))
        return out

    def missing(self, cam: str) -> list[int]:
        """Seqs of ``cam`` inside a series (from its first to its highest) never received."""
        got = self.seqs(cam)
        return [s for first, last in self.series(cam) for s in range(first, last + 1)
                if s not in got]

    def resets(self, cam: str) -> int:
        """New series after the first one (each a reset, not a loss)."""
        return len(self.series(cam)) - 1


def leftover_rows(db: Path) -> set[tuple[str, int]]:
    """(camera, seq) of every row in an outbox file whose agent has exited."""
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute("SELECT payload FROM results").fetchall()
    finally:
        conn.close()
    out = set()
    for (payload,) in rows:
        obj = orjson.loads(payload)
        out.add((str(obj["camera"]), int(obj["seq"])))
    return out
