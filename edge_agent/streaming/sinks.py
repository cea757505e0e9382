"""Where results go: the ``ResultSink`` interface and a JSON-lines file sink.

The pipeline hands every result to one sink and does not care what it is: the durable MQTT
outbox in production (``edge_agent.outbox.facade``), a JSON-lines file when no broker is configured,
for tests and for ``edge-agent batch``. The interface is deliberately tiny and synchronous so
the per-frame path costs microseconds: ``publish`` assigns the camera's next ``seq``, serializes
and appends to memory; the disk work happens in a background thread.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import orjson
import structlog

from edge_agent.contract.protocol import encode_dict

log = structlog.get_logger(__name__)


@runtime_checkable
class ResultSink(Protocol):
    """Takes results (``protocol.ResultMessage``-shaped dicts without ``seq``).

    ``publish`` is called on the event loop thread and must be cheap: it serializes with
    ``protocol.encode_dict`` and queues the bytes; the sink gives the result its per-camera
    ``seq`` (never going back for a camera), at once or, in the durable outbox, when the result
    is committed. It never raises because the sink is full: drops are counted and logged by the
    sink. ``aclose`` writes out what is queued, within the caller's time bound.
    """

    def publish(self, result: dict[str, Any]) -> int | None:
        """Queue ``result``; return the ``seq`` it was given, or None if it gets one later."""
        ...

    async def aclose(self) -> None:
        """Flush what is queued and release the sink's resources."""
        ...


class SeqCounter:
    """Per-camera sequence numbers: 0, 1, 2, ... for each camera, in publish order.

    Single-threaded by contract (the event loop thread), so no lock.
    """

    def __init__(self, start: dict[str, int] | None = None) -> None:
        #: Next seq per camera.
        self._next: dict[str, int] = dict(start or {})

    def next(self, camera: str) -> int:
        """Return the camera's next seq and advance it."""
        seq = self._next.get(camera, 0)
        self._next[camera] = seq + 1
        return seq

    def snapshot(self) -> dict[str, int]:
        """The next seq per camera (a copy)."""
        return dict(self._next)


def _scan_next_seq(path: Path) -> dict[str, int]:
    """Read an existing JSON-lines results file and return 1 + the largest seq per camera."""
    nxt: dict[str, int] = {}
    with path.open("rb") as fh:
        for line in fh:
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # a torn last line after a crash: ignored, the seq resumes past the rest
            if isinstance(obj, dict):
                cam, seq = obj.get("camera"), obj.get("seq")
                if isinstance(cam, str) and isinstance(seq, int):
                    nxt[cam] = max(nxt.get(cam, 0), seq + 1)
    return nxt


class JsonLinesSink:
    """Appends one JSON object per line to a file, written by a background thread.

    ``publish`` only assigns the seq, serializes (orjson, a few microseconds) and appends the
    bytes to an in-memory deque; a writer thread writes and flushes the deque every
    ``flush_interval_s``. At most ``max_pending`` lines wait in memory; beyond that new results
    are dropped, counted in ``dropped`` and logged at most once per second, so a stuck disk
    cannot grow memory without bound.

    Each counter has one writer: ``published`` and ``refused`` the caller of ``publish``,
    ``written`` and ``lost`` the writer thread (``close_sync`` after it joined); ``dropped`` is
    their sum for readers.

    With ``append=True`` an existing file is kept and each camera's seq resumes after the largest
    one already in it, so (node, camera, seq) stays unique across restarts. ``append=False``
    truncates (the batch mode's output).
    """

    def __init__(
        self,
        path: Path | str,
        *,
        append: bool = True,
        flush_interval_s: float = 0.2,
        max_pending: int = 100_000,
    ) -> None:
        self.path = Path(path)
        self._append = append
        self._flush_interval_s = flush_interval_s
        self._max_pending = max_pending
        self._pending: collections.deque[bytes] = collections.deque()
        self._seq = SeqCounter()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._fh: Any = None
        self._last_drop_log = 0.0
        #: Results accepted by ``publish``.
        self.published = 0
        #: Results refused because ``max_pending`` lines were already waiting.
        self.refused = 0
        #: Lines lost because writing them failed (a full or broken disk).
        self.lost = 0
        #: Lines written to the file so far.
        self.written = 0
        self._write_error: OSError | None = None

    # ------------------------------------------------------------------ lifecycle

    def open_sync(self) -> JsonLinesSink:
        """Open the file (scanning it for seqs when appending) and start the writer thread."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._append and self.path.exists():
            self._seq = SeqCounter(_scan_next_seq(self.path))
        self._fh = self.path.open("ab" if self._append else "wb")
        self._thread = threading.Thread(
            target=self._writer, name=f"jsonl-sink[{self.path.name}]", daemon=True
        )
        self._thread.start()
        return self

    async def open(self) -> JsonLinesSink:
        """``open_sync`` in a thread (file system calls never run on the event loop)."""
        return await asyncio.to_thread(self.open_sync)

    def close_sync(self) -> None:
        """Stop the writer after it wrote everything queued, and close the file."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._fh is not None:
            self._drain_once()
            self._fh.close()
            self._fh = None

    async def aclose(self) -> None:
        """``close_sync`` in a thread."""
        await asyncio.to_thread(self.close_sync)

    @property
    def dropped(self) -> int:
        """Results that never reached the file: refused (backlog) or lost (write failed)."""
        return self.refused + self.lost

    # ------------------------------------------------------------------ hot path

    def publish(self, result: dict[str, Any]) -> int:
        """Assign the camera's next seq, serialize and queue; return the seq."""
        seq = self._seq.next(result["camera"])
        result["seq"] = seq
        if len(self._pending) >= self._max_pending:
            self.refused += 1
            now = time.monotonic()
            if now - self._last_drop_log >= 1.0:
                self._last_drop_log = now
                log.warning("results_dropped", sink="jsonl", reason="backlog", total=self.dropped)
            return seq
        self._pending.append(encode_dict(result))
        self.published += 1
        return seq

    def flush_soon(self) -> None:
        """Ask the writer to write now rather than at its next interval."""
        self._wake.set()

    @property
    def pending(self) -> int:
        """Lines waiting to be written."""
        return len(self._pending)

    # ------------------------------------------------------------------ writer thread

    def _drain_once(self) -> None:
        lines: list[bytes] = []
        pop = self._pending.popleft
        try:
            while True:
                lines.append(pop())
        except IndexError:
            pass
        if not lines:
            return
        try:
            self._fh.write(b"\n".join(lines) + b"\n")
            self._fh.flush()
            self.written += len(lines)
        except OSError as exc:
            # a full or broken disk: count what is lost and say so once per burst
            self.lost += len(lines)
            if self._write_error is None or str(exc) != str(self._write_error):
                log.error("results_write_failed", sink="jsonl", path=str(self.path),
                          error=str(exc), lost=len(lines))
            self._write_error = exc

    def _writer(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._flush_interval_s)
            self._wake.clear()
            self._drain_once()
