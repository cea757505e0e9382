"""Inference scheduling: every camera's newest frame onto a small fixed pool of workers.

The work in flight is bounded by construction: each camera has one slot (its newest frame,
already preprocessed by its capture thread), and a fixed number of worker threads each run one
``session.run`` at a time. Under overload a camera's next frame replaces the one still waiting
and the replaced frame is counted as dropped, so memory stays flat and a frame waits at most
about one inference per worker round, however far behind inference is. Cameras are served in
the order their frames arrived, and a camera that offers again keeps its place in line, so a
fast camera cannot starve a slow one.

When a model has a dynamic batch axis, a worker takes the waiting frames of other cameras on the
same model into the same ``session.run`` (up to the model's batch limit). It never waits for a
batch to fill: batching only happens when frames are already waiting, so it adds no latency.
How many workers and how large a batch are measured on the machine (``calibrate``) unless the
config fixes them.

Workers build results as plain dicts in the wire format and hand them to ``emit`` (the pipeline
relays them to the sink on the event loop). No pydantic, no log line, no allocation beyond the
result itself per frame.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import structlog

from edge_agent.capture.camera import Camera, Frame
from edge_agent.errors import ModelError
from edge_agent.streaming.metrics import AgentMetrics
from edge_agent.streaming.slots import ModelSlot

log = structlog.get_logger(__name__)

#: (perf_counter at read, result dict) pairs handed to the pipeline.
Emit = Callable[[list[tuple[float, dict[str, Any]]]], None]


class Scheduler:
    """The per-camera frame slots and the inference worker threads (a ``FrameConsumer``)."""

    def __init__(
        self,
        *,
        node: str,
        slots: Mapping[str, ModelSlot],
        workers: int,
        emit: Emit,
        metrics: AgentMetrics,
        batch_limits: dict[str, int] | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.node = node
        #: The model slot per model name; a frame runs on its slot's model at that moment.
        self.model_slots = slots
        self.workers = workers
        #: Largest batch per model name (1 when absent).
        self.batch_limits: dict[str, int] = dict(batch_limits or {})
        self._emit = emit
        self._metrics = metrics
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._room = threading.Condition(self._lock)
        self._pending: dict[str, tuple[Frame, Camera]] = {}
        self._ready: collections.deque[str] = collections.deque()
        self._stopping = False
        self._drain = False
        self._threads: list[threading.Thread] = []
        #: Per worker: ``time.monotonic()`` when its current batch started, or None when idle.
        self._busy_since: list[float | None] = [None] * workers
        self._last_error_log = 0.0
        self._errors_since_log = 0
        #: Frames inferred, batches run, frames whose inference failed.
        self.frames = 0
        self.batches = 0
        self.errors = 0
        #: Failed frames per (model, version); only ever incremented (telemetry takes deltas).
        self.errors_by_model: collections.Counter[tuple[str, str]] = collections.Counter()

    # ------------------------------------------------------------------ FrameConsumer

    def offer(self, frame: Frame, camera: Camera) -> None:
        """Keep ``frame`` as the camera's newest; the frame it replaces is counted dropped."""
        if frame.model is None:  # no model loaded for this camera (yet): nothing to run it on
            camera.dropped += 1
            return
        name = camera.name
        with self._lock:
            if self._stopping:
                camera.dropped += 1
                return
            if name in self._pending:
                camera.dropped += 1
                self._pending[name] = (frame, camera)  # keeps its place in ``_ready``
            else:
                self._pending[name] = (frame, camera)
                self._ready.append(name)
                self._work.notify()

    def wait_room(self, camera: Camera, timeout: float) -> bool:
        """Block until the camera's waiting frame was taken; False after ``timeout``."""
        name = camera.name
        with self._lock:
            return self._room.wait_for(lambda: name not in self._pending or self._stopping,
                                       timeout)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the worker threads."""
        for i in range(self.workers):
            t = threading.Thread(target=self._worker, args=(i,), name=f"infer[{i}]",
                                 daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, *, drain: bool = True, timeout: float | None = None) -> bool:
        """Stop the workers (after running the waiting frames when ``drain``); True if joined."""
        with self._lock:
            self._stopping = True
            self._drain = drain
            if not drain:
                for _, cam in self._pending.values():
                    cam.dropped += 1
                self._pending.clear()
                self._ready.clear()
            self._work.notify_all()
            self._room.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        ok = True
        for t in self._threads:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            t.join(left)
            ok = ok and not t.is_alive()
        return ok

    @property
    def waiting(self) -> int:
        """Frames waiting in slots."""
        return len(self._pending)

    def stuck_for(self) -> float:
        """Seconds the longest-running current batch has run (0 when all workers are idle)."""
        now = time.monotonic()
        busy = [now - b for b in self._busy_since if b is not None]
        return max(busy, default=0.0)

    # ------------------------------------------------------------------ workers

    def _take(self) -> list[tuple[Frame, Camera]] | None:
        with self._lock:
            while not self._ready:
                if self._stopping:
                    return None
                self._work.wait()
            if self._stopping and not self._drain:
                return None
            name = self._ready.popleft()
            first = self._pending.pop(name)
            batch = [first]
            frame = first[0]
            limit = self.batch_limits.get(frame.model_name, 1)
            if limit > 1 and self._ready:
                keep: list[str] = []
                while self._ready and len(batch) < limit:
                    other = self._ready.popleft()
                    f2 = self._pending[other][0]
                    if f2.model is frame.model and f2.tensor.shape == frame.tensor.shape:
                        batch.append(self._pending.pop(other))
                    else:
                        keep.append(other)
                self._ready.extendleft(reversed(keep))
            self._room.notify_all()
            return batch

    def _worker(self, idx: int) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            self._busy_since[idx] = time.monotonic()
            try:
                self._run_batch(batch)
            finally:
                self._busy_since[idx] = None

    def _run_batch(self, batch: list[tuple[Frame, Camera]]) -> None:
        slot = self.model_slots.get(batch[0][0].model_name)
        try:
            if slot is None:
                raise ModelError(f"no model slot {batch[0][0].model_name!r}")
            model = slot.acquire()
        except ModelError:  # unloaded since the frame was preprocessed
            for _, cam in batch:
                cam.dropped += 1
            return
        error: str | None = None
        try:
            self._infer(model, [f for f, _ in batch])
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"[:300]
            self._count_error(model, len(batch), error)
        finally:
            slot.release(model, None)
        # one outcome per frame, for the probation of a freshly swapped-in version
        slot.report(model, len(batch), error)

    def _infer(self, model: Any, frames: list[Frame]) -> None:
        perf = time.perf_counter
        for f in frames:
            if f.model is not model:  # a hot swap happened since the capture thread prepared it
                f.tensor, f.meta = model.preprocess(f.image)
                f.model = model
        t_start = perf()
        x = frames[0].tensor if len(frames) == 1 else np.concatenate([f.tensor for f in frames])
        outputs = model.run(x)
        t_inf = perf()
        outs = model.postprocess(outputs, [f.meta for f in frames])
        t_post = perf()
        obs = self._metrics.observers(model.name, model.version)
        inf_s = t_inf - t_start
        post_s = t_post - t_inf
        inf_ms = round(inf_s * 1000.0, 3)
        post_ms = round(post_s * 1000.0, 3)
        ref = {"name": model.name, "version": model.version}
        task = model.task
        node = self.node
        items: list[tuple[float, dict[str, Any]]] = []
        for f, out in zip(frames, outs, strict=True):
            wait_s = t_start - f.t_read - f.preprocess_ms / 1000.0
            res: dict[str, Any] = {
                "v": 1,
                "node": node,
                "camera": f.camera,
                "ts": f.ts,
                "model": ref,
                "task": task,
                "frame": {"width": f.width, "height": f.height},
                "latency_ms": {
                    "capture_to_start": round(wait_s * 1000.0, 3),
                    "preprocess": round(f.preprocess_ms, 3),
                    "inference": inf_ms,
                    "postprocess": post_ms,
                    "end_to_end": 0.0,  # set when the result reaches the sink
                },
            }
            res.update(out)
            items.append((f.t_read, res))
            obs.capture_to_start.observe(wait_s)
            obs.preprocess.observe(f.preprocess_ms / 1000.0)
            obs.inference.observe(inf_s)
            obs.postprocess.observe(post_s)
        obs.frames.inc(len(frames))
        obs.batch.observe(len(frames))
        self.frames += len(frames)
        self.batches += 1
        self._emit(items)

    def _count_error(self, model: Any, n: int, error: str) -> None:
        self.errors += n
        self.errors_by_model[(model.name, model.version)] += n
        self._metrics.observers(model.name, model.version).errors.inc(n)
        self._errors_since_log += n
        now = time.monotonic()
        if now - self._last_error_log >= 5.0:  # one line per burst, not per frame
            log.error("inference_failed", model=model.name, version=model.version,
                      frames=self._errors_since_log, error=error)
            self._last_error_log = now
            self._errors_since_log = 0


# ------------------------------------------------------------------------- calibration


#: How much faster than the default (one worker per CPU, no batching) another configuration
#: must measure at start-up to be chosen.
MARGIN = 0.05


def _throughput(model: Any, x: np.ndarray, workers: int, seconds: float) -> float:
    """Frames per second of ``workers`` threads running ``model.run(x)`` back to back.

    Each thread is timed from its first completion to its last, so a short window does not
    gain or lose a fraction of an inference at its edges (at 0.4 s and 30 ms an inference,
    plain counting would be off by up to 8 %).
    """
    stop = threading.Event()
    stamps: list[list[float]] = [[] for _ in range(workers)]
    n = x.shape[0]

    def loop(i: int) -> None:
        model.run(x)  # warm-up for this shape and thread, not timed
        barrier.wait()
        mine = stamps[i]
        mine.append(time.perf_counter())
        while not stop.is_set():
            model.run(x)
            mine.append(time.perf_counter())

    barrier = threading.Barrier(workers + 1)
    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(workers)]
    for t in threads:
        t.start()
    barrier.wait()
    stop.wait(seconds)
    stop.set()
    for t in threads:
        t.join()
    return float(sum((len(ts) - 1) * n / (ts[-1] - ts[0]) for ts in stamps if len(ts) >= 2))


def calibrate(
    model: Any,
    *,
    workers: Sequence[int],
    batches: Sequence[int] = (1,),
    seconds: float = 0.4,
    passes: int = 2,
    sample: np.ndarray | None = None,
) -> tuple[int, int, dict[str, float]]:
    """Time each (workers, batch) candidate on ``model``; return the best and all figures.

    Every candidate runs ``passes`` times, interleaved, and keeps its best figure, so a burst
    of other work on a shared machine does not decide. The default, one worker per CPU
    (``max(workers)``) without batching, is what single-threaded sessions are built for; any
    other candidate must beat it by ``MARGIN`` to be chosen, so noise at start-up (another pod
    loading, a neighbour's burst) cannot talk the agent out of it, while a model or device that
    really prefers fewer workers (a GPU) or batches still gets them. Runs in the calling thread
    (startup, off the event loop).
    """
    if sample is None:
        rng = np.random.default_rng(0)
        sample = rng.integers(0, 255, (720, 1280, 3), dtype=np.uint8)
    one, _ = model.preprocess(sample)
    cands = [(w, b) for b in sorted(set(batches)) for w in sorted(set(workers))]
    figures: dict[str, float] = {}
    for _ in range(max(1, passes)):
        for w, b in cands:
            x = one if b == 1 else np.concatenate([one] * b)
            key = f"w{w}b{b}"
            figures[key] = round(max(figures.get(key, 0.0), _throughput(model, x, w, seconds)),
                                 2)
    w0, b0 = max(workers), min(batches)
    best = (figures[f"w{w0}b{b0}"], w0, b0)
    for w, b in cands:
        fps = figures[f"w{w}b{b}"]
        if fps > best[0] * (1.0 + MARGIN) and fps > figures[f"w{w0}b{b0}"] * (1.0 + MARGIN):
            best = (fps, w, b)
    return best[1], best[2], figures


def worker_candidates() -> list[int]:
    """1 up to the CPUs this process may use (at most 8)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return list(range(1, min(n, 8) + 1))
