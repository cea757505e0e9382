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
How many workers and how large a batch are measured on the machine (``streaming.calibration``)
unless the config fixes them.

Workers build results with ``contract.results`` (plain dicts in the wire format) and hand them
to ``emit`` (the pipeline relays them to the sink on the event loop). No pydantic, no log line,
no allocation beyond the result itself per frame.

A model with a candidate in shadow (``streaming.shadow``) hands, after its results went out, at
most one frame and its output per batch to the shadow thread, within the shadow's CPU budget.

Counters have one writer each. A camera's ``dropped`` is written only here, always under the
scheduler's lock (capture threads offer under it, workers and ``stop`` drop under it). What the
workers count (frames, batches, failures per model version) lives in one ``Tally`` per worker,
written only by that worker's thread; ``tally()`` sums them for readers.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog

from edge_agent.capture.camera import Camera, Frame
from edge_agent.contract import results, snapshots
from edge_agent.errors import ModelError
from edge_agent.inference.preprocess import FrameMeta
from edge_agent.streaming.metrics import AgentMetrics
from edge_agent.streaming.shadow import ShadowRunner
from edge_agent.streaming.slots import ModelSlot, ServingModel

log = structlog.get_logger(__name__)

#: (perf_counter at read, result dict) pairs handed to the pipeline.
Emit = Callable[[list[tuple[float, dict[str, Any]]]], None]
#: Seconds between ``inference_failed`` lines while failures go on (one line per burst).
ERROR_LOG_INTERVAL_S = 5.0


@dataclass(frozen=True, slots=True)
class Prepared:
    """A frame made ready, in its capture thread, for the model that served at that moment."""

    model: ServingModel
    #: The ``[1, ...]`` input tensor.
    tensor: np.ndarray
    #: The geometry post-processing needs to map boxes back onto the frame.
    meta: FrameMeta


#: A captured frame as the streaming layer sees it (``Frame.prepared`` is a ``Prepared``).
StreamFrame = Frame[Prepared]
#: A frame waiting for a worker: the frame, its camera and what its capture thread prepared.
Job = tuple[StreamFrame, Camera, Prepared]


def prepare(model: ServingModel, image: np.ndarray) -> Prepared:
    """Preprocess ``image`` for ``model`` (capture threads, and workers after a hot swap)."""
    tensor, meta = model.preprocess(image)
    return Prepared(model, tensor, meta)


@dataclass(slots=True)
class Tally:
    """What the workers counted: one per worker (written by that thread only), or a sum."""

    #: Frames inferred (results produced).
    frames: int = 0
    #: ``session.run`` calls.
    batches: int = 0
    #: Frames whose inference or post-processing failed.
    errors: int = 0
    #: Failed frames per (model, version), only ever growing (telemetry takes deltas). The
    #: owner replaces the mapping instead of changing it, so a reader never sees it change.
    errors_by_model: Mapping[tuple[str, str], int] = field(default_factory=dict)
    #: Seconds this worker waited for a frame (the re-evaluation's "is the queue backed up").
    idle_s: float = 0.0
    #: (frames done, ``time.perf_counter()`` of the latest completion), replaced as one tuple
    #: after each batch so a reader never pairs a count with another batch's time; the live
    #: re-evaluation (``streaming.retune``) times each worker from completion to completion.
    done: tuple[int, float | None] = (0, None)

    def add_errors(self, key: tuple[str, str], n: int) -> None:
        """Count ``n`` failed frames of model version ``key`` (the owning thread only)."""
        self.errors += n
        self.errors_by_model = {**self.errors_by_model,
                                key: self.errors_by_model.get(key, 0) + n}


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
        self._pending: dict[str, Job] = {}
        self._ready: collections.deque[str] = collections.deque()
        self._stopping = False
        self._drain = False
        self._threads: list[threading.Thread] = []
        #: Worker threads started and not retired (``resize`` retires the surplus).
        self._running = 0  # guarded by _lock
        #: Per worker: ``time.monotonic()`` when its current batch started, or None when idle.
        self._busy_since: list[float | None] = [None] * workers
        #: Per worker: what it counted (see ``Tally``).
        self._tallies = [Tally() for _ in range(workers)]
        self._last_error_log = 0.0  # guarded by _lock
        self._errors_since_log = 0  # guarded by _lock
        #: Candidates in shadow: after each batch, a frame and its output may go to one
        #: (``streaming.shadow``); None runs no shadow. Set before ``start``.
        self.shadow: ShadowRunner | None = None
        #: Which cameras' results carry their frame to the sink (``snapshots.FRAME_KEY``: the
        #: tracking sink's snapshot crops); None: none. Set before ``start``.
        self.keep_image: Callable[[str], bool] | None = None

    # ------------------------------------------------------------------ FrameConsumer

    def offer(self, frame: StreamFrame, camera: Camera) -> None:
        """Keep ``frame`` as the camera's newest; the frame it replaces is counted dropped."""
        prepared = frame.prepared
        name = camera.name
        with self._lock:
            # no model loaded for this camera (yet), or stopping: nothing will run it
            if prepared is None or self._stopping:
                camera.dropped += 1
                return
            if name in self._pending:
                camera.dropped += 1
                self._pending[name] = (frame, camera, prepared)  # keeps its place in line
            else:
                self._pending[name] = (frame, camera, prepared)
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
        with self._lock:
            self._running = self.workers
        for i in range(self.workers):
            self._spawn(i)

    def _spawn(self, idx: int) -> None:
        t = threading.Thread(target=self._worker, args=(idx,), name=f"infer[{idx}]",
                             daemon=True)
        t.start()
        self._threads.append(t)

    def resize(self, workers: int) -> None:
        """Run ``workers`` worker threads from now on (a re-measured layout, adopted live).

        More: new threads start at once. Fewer: the surplus workers exit when they next look
        for work (after their current batch). Tallies of exited workers stay in the sums.
        """
        if workers < 1:
            raise ValueError("workers must be >= 1")
        with self._lock:
            if self._stopping:
                return
            new = list(range(len(self._tallies),
                             len(self._tallies) + max(0, workers - self._running)))
            self._tallies += [Tally() for _ in new]
            self._busy_since += [None for _ in new]
            self.workers = workers
            self._running += len(new)
            self._work.notify_all()  # idle surplus workers wake up and exit
        for i in new:
            self._spawn(i)

    def set_batch_limit(self, model_name: str, limit: int) -> None:
        """The largest batch of ``model_name`` from the next batch on."""
        with self._lock:
            self.batch_limits = {**self.batch_limits, model_name: max(1, limit)}

    def stop(self, *, drain: bool = True, timeout: float | None = None) -> bool:
        """Stop the workers (after running the waiting frames when ``drain``); True if joined."""
        with self._lock:
            self._stopping = True
            self._drain = drain
            if not drain:
                for _, cam, _ in self._pending.values():
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

    def progress(self) -> list[tuple[int, float | None]]:
        """Each worker's ``Tally.done``, in spawn order (retired workers' stop changing)."""
        return [t.done for t in list(self._tallies)]

    def tally(self) -> Tally:
        """The workers' counts summed (a snapshot; any thread)."""
        total = Tally()
        errors: dict[tuple[str, str], int] = {}
        for t in self._tallies:
            total.frames += t.frames
            total.batches += t.batches
            total.errors += t.errors
            total.idle_s += t.idle_s
            for key, n in t.errors_by_model.items():  # a mapping its owner never changes
                errors[key] = errors.get(key, 0) + n
        total.errors_by_model = errors
        return total

    # ------------------------------------------------------------------ workers

    def _take(self, tally: Tally) -> list[Job] | None:
        with self._lock:
            while not self._ready or self._running > self.workers:
                if self._running > self.workers:  # resized down: this worker retires
                    self._running -= 1
                    return None
                if self._stopping:
                    return None
                t_wait = time.perf_counter()
                self._work.wait()
                tally.idle_s += time.perf_counter() - t_wait
            if self._stopping and not self._drain:
                return None
            first = self._pending.pop(self._ready.popleft())
            batch = [first]
            frame, _, prep = first
            limit = self.batch_limits.get(frame.model_name, 1)
            if limit > 1 and self._ready:
                keep: list[str] = []
                while self._ready and len(batch) < limit:
                    other = self._ready.popleft()
                    p2 = self._pending[other][2]
                    if p2.model is prep.model and p2.tensor.shape == prep.tensor.shape:
                        batch.append(self._pending.pop(other))
                    else:
                        keep.append(other)
                self._ready.extendleft(reversed(keep))
            self._room.notify_all()
            return batch

    def _worker(self, idx: int) -> None:
        tally = self._tallies[idx]
        while True:
            batch = self._take(tally)
            if batch is None:
                return
            self._busy_since[idx] = time.monotonic()
            try:
                self._run_batch(batch, tally)
            finally:
                self._busy_since[idx] = None

    def _run_batch(self, batch: list[Job], tally: Tally) -> None:
        slot = self.model_slots.get(batch[0][0].model_name)
        try:
            if slot is None:
                raise ModelError(f"no model slot {batch[0][0].model_name!r}")
            model = slot.acquire()
        except ModelError:  # unloaded since the frame was preprocessed
            with self._lock:
                for _, cam, _ in batch:
                    cam.dropped += 1
            return
        error: str | None = None
        try:
            self._infer(model, batch, tally)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"[:300]
            self._count_error(model, len(batch), error, tally)
        finally:
            slot.release(model, None)
        # one outcome per frame, for the probation of a freshly swapped-in version
        slot.report(model, len(batch), error)

    def _infer(self, model: ServingModel, batch: list[Job], tally: Tally) -> None:
        perf = time.perf_counter
        ready = [p if p.model is model else _prepare_again(model, f) for f, _, p in batch]
        t_start = perf()
        x = ready[0].tensor if len(ready) == 1 else np.concatenate([p.tensor for p in ready])
        outputs = model.run(x)
        t_inf = perf()
        outs = model.postprocess(outputs, [p.meta for p in ready])
        t_post = perf()
        obs = self._metrics.observers(model.name, model.version)
        inf_s = t_inf - t_start
        post_s = t_post - t_inf
        node = self.node
        items: list[tuple[float, dict[str, Any]]] = []
        keep_image = self.keep_image
        for (f, _, _), out in zip(batch, outs, strict=True):
            wait_s = t_start - f.t_read - f.preprocess_ms / 1000.0
            lat = results.latencies(capture_to_start=wait_s * 1000.0,
                                    preprocess=f.preprocess_ms, inference=inf_s * 1000.0,
                                    postprocess=post_s * 1000.0,
                                    end_to_end=0.0)  # set when the result reaches the sink
            res = results.build_result(node=node, camera=f.camera, ts=f.ts, model=model,
                                       width=f.width, height=f.height, latency_ms=lat,
                                       output=out)
            if keep_image is not None and f.image is not None and keep_image(f.camera):
                res[snapshots.FRAME_KEY] = f.image
            items.append((f.t_read, res))
            obs.capture_to_start.observe(wait_s)
            obs.preprocess.observe(f.preprocess_ms / 1000.0)
            obs.inference.observe(inf_s)
            obs.postprocess.observe(post_s)
        obs.frames.inc(len(batch))
        obs.batch.observe(len(batch))
        tally.frames += len(batch)
        tally.batches += 1
        tally.done = (tally.frames, t_post)
        self._emit(items)
        shadow = self.shadow
        # after the results are on their way (never delays them); nothing without a candidate
        if shadow is not None and shadow.has_candidate(model.name):
            shadow.after_batch(model, [(f.image, out) for (f, _, _), out in
                                       zip(batch, outs, strict=True)], t_post - t_start)

    def _count_error(self, model: ServingModel, n: int, error: str, tally: Tally) -> None:
        tally.add_errors((model.name, model.version), n)
        self._metrics.observers(model.name, model.version).errors.inc(n)
        with self._lock:  # the log's rate limit is shared by the workers
            self._errors_since_log += n
            now = time.monotonic()
            if now - self._last_error_log < ERROR_LOG_INTERVAL_S:
                return
            self._last_error_log = now
            frames, self._errors_since_log = self._errors_since_log, 0
        log.error("inference_failed", model=model.name, version=model.version, frames=frames,
                  error=error)


def _prepare_again(model: ServingModel, frame: StreamFrame) -> Prepared:
    """A hot swap happened since the capture thread prepared ``frame``: prepare it anew."""
    if frame.image is None:
        raise ModelError(f"frame {frame.index} of {frame.camera} kept no image to prepare")
    return prepare(model, frame.image)
