"""Model slots: the one place the pipeline reads "which model serves name X right now".

A hot swap must happen *between* frames and must never close a session that a worker thread is
still running. So the pipeline does not hold a ``LoadedModel`` for long: for each frame (or
batch) it leases the slot's current model, and returns the lease when the frame is done, saying
whether it succeeded. Model sync replaces the slot's model with one reference assignment under a
lock (frames already in flight finish on the old model, the next frame gets the new one), and
closes the old session only after its last lease came back.

The lease also feeds the probation of a freshly switched-in version: the first N outcomes are
counted, and too many failures call back into model sync, which switches back to the previous
version (still loaded during probation, so the switch back is as instant as the switch).

Leases are taken and returned from the event loop or from worker threads; they cost a lock and
a dict update (microseconds), nothing per frame touches the disk or the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import structlog

from edge_agent.contract import results
from edge_agent.errors import ModelError

if TYPE_CHECKING:
    from edge_agent.inference.engine import InferOutput
    from edge_agent.inference.preprocess import FrameMeta

log = structlog.get_logger(__name__)


class ServingModel(results.ResultModel, Protocol):
    """What the frame path needs from a loaded model; ``inference.engine.LoadedModel`` is one.

    Slots hold it; capture threads preprocess with it; workers run and post-process batches on
    it; calibration times it; an HTTP upload infers one image with it; model sync, metrics and
    ``/v1/models`` read who it is (``name``, ``version`` and ``task``, as a result names its
    model). Every method may run in several threads at once.
    """

    @property
    def sha256(self) -> str:
        """The ONNX file's digest."""
        ...

    @property
    def providers(self) -> Sequence[str]:
        """Execution providers the session runs on, preferred first."""
        ...

    @property
    def batch_dynamic(self) -> bool:
        """True when one ``run`` may take several frames (a dynamic batch axis)."""
        ...

    def preprocess(self, frame_bgr: np.ndarray) -> tuple[np.ndarray, FrameMeta]:
        """A ``[1, ...]`` input tensor for one BGR frame, and the geometry to undo it."""
        ...

    def run(self, batch_tensor: np.ndarray) -> list[np.ndarray]:
        """Run a ``[B, ...]`` batch; outputs in the manifest's order."""
        ...

    def postprocess(
        self, outputs: Sequence[np.ndarray], metas: Sequence[FrameMeta]
    ) -> list[dict[str, Any]]:
        """One result part (``detections`` or ``classes``) per frame of the batch."""
        ...

    def infer(self, frame_bgr: np.ndarray) -> InferOutput:
        """Preprocess, run and post-process one frame, timing each stage."""
        ...

    def close(self) -> None:
        """Release the session."""
        ...


@dataclass
class Probation:
    """Counts the first ``frames`` outcomes of a new version; ``failures`` of them fail it."""

    model: ServingModel
    frames: int
    failures: int
    #: Called (on the event loop) with the last error when the failure limit is reached.
    on_fail: Callable[[str], None]
    #: Called (on the event loop) when ``frames`` outcomes came back with fewer failures.
    on_pass: Callable[[], None]
    seen: int = 0
    failed: int = 0
    done: bool = False
    errors: list[str] = field(default_factory=list)


class ModelSlot:
    """Holds the model serving one model name; see the module docstring."""

    def __init__(self, name: str, model: ServingModel | None = None) -> None:
        self.name = name
        self._model: ServingModel | None = model
        self._lock = threading.Lock()
        #: In-flight leases per model object (by id), so a replaced model is closed only idle.
        self._inflight: dict[int, int] = {}
        self._idle: dict[int, asyncio.Event] = {}
        self._probation: Probation | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Number of switches (tests and metrics).
        self.swaps = 0

    # ---------------------------------------------------------------------- pipeline side

    @property
    def model(self) -> ServingModel | None:
        """The model serving now (None before one was loaded). Do not keep it across frames."""
        return self._model

    @property
    def version(self) -> str | None:
        """The version serving now."""
        m = self._model
        return None if m is None else str(m.version)

    def acquire(self) -> ServingModel:
        """Lease the current model for one frame or batch; pair with ``release``."""
        with self._lock:
            m = self._model
            if m is None:
                raise ModelError(f"model {self.name!r} is not loaded")
            key = id(m)
            self._inflight[key] = self._inflight.get(key, 0) + 1
            return m

    def release(
        self, model: ServingModel, ok: bool | None = True, error: str | None = None
    ) -> None:
        """Return a lease taken with ``acquire`` and say whether the frame succeeded.

        ``ok=None`` returns the lease without an outcome (a frame dropped before inference).
        """
        fire: tuple[Callable[..., None], tuple[Any, ...]] | None = None
        with self._lock:
            key = id(model)
            left = self._inflight.get(key, 0) - 1
            if left <= 0:
                self._inflight.pop(key, None)
                ev = self._idle.pop(key, None)
                if ev is not None:
                    fire = (ev.set, ())
            else:
                self._inflight[key] = left
        if fire is not None:
            self._call_soon(*fire)
        if ok is not None:
            self.report(model, 1, None if ok else (error or "inference failed"))

    def report(
        self, model: ServingModel, frames: int = 1, error: BaseException | str | None = None
    ) -> None:
        """Count the outcome of ``frames`` frames run on ``model`` (any thread, no lease needed).

        The pipeline calls this once per batch; only the outcomes of a version on probation
        matter, the call is a lock and a comparison otherwise.
        """
        p = self._probation
        if p is None or p.model is not model or p.done:
            return
        with self._lock:
            if p.done:
                return
            fire = self._count(p, frames, error)
        if fire is not None:
            self._call_soon(*fire)

    @contextmanager
    def lease(self) -> Iterator[ServingModel]:
        """``with slot.lease() as model:`` one frame; an exception counts as a failed frame."""
        m = self.acquire()
        try:
            yield m
        except BaseException as exc:
            self.release(m, ok=False, error=f"{type(exc).__name__}: {exc}")
            raise
        self.release(m, ok=True)

    # -------------------------------------------------------------------- model sync side

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop callbacks (probation outcome, idle events) are delivered on."""
        self._loop = loop

    def swap(
        self, new: ServingModel | None, probation: Probation | None = None
    ) -> ServingModel | None:
        """Make ``new`` serve from the next lease on; return the model it replaced."""
        with self._lock:
            old, self._model = self._model, new
            self._probation = probation
            self.swaps += 1
        return old

    def end_probation(self) -> None:
        """Stop counting outcomes (probation passed, timed out or was superseded)."""
        with self._lock:
            if self._probation is not None:
                self._probation.done = True
            self._probation = None

    def inflight(self, model: ServingModel) -> int:
        """Leases of ``model`` not yet returned."""
        with self._lock:
            return self._inflight.get(id(model), 0)

    async def wait_idle(self, model: ServingModel, timeout: float) -> bool:
        """Wait until no lease of ``model`` is out (True) or ``timeout`` passed (False)."""
        with self._lock:
            if not self._inflight.get(id(model)):
                return True
            ev = self._idle.setdefault(id(model), asyncio.Event())
        try:
            await asyncio.wait_for(ev.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def retire(self, box: list[ServingModel], timeout: float) -> str | None:
        """Release a replaced model (popped from ``box``) once no frame uses it any more.

        Frames the old model already preprocessed still hold it (the scheduler re-preprocesses
        them for the new one when it takes them), so the session is released when the last
        reference goes: leases first, then every other reference, watched with a weak
        reference whose callback fires in whichever thread drops the last one. The model
        travels in a one-element list so no caller's variable keeps it alive. If something
        still holds it after ``timeout`` its session is closed anyway, so a stray reference
        cannot keep a session's memory forever. Returns ``released``,
        ``closed_while_referenced`` or None (nothing to retire).
        """
        model = box.pop() if box else None
        if model is None:
            return None
        deadline = time.monotonic() + timeout
        version = str(model.version)
        await self.wait_idle(model, timeout)
        loop = asyncio.get_running_loop()
        gone = asyncio.Event()
        try:
            ref = weakref.ref(model, lambda _r: loop.call_soon_threadsafe(gone.set))
        except TypeError:  # not weak-referenceable: close once the leases came back
            await asyncio.to_thread(model.close)
            log.info("model_released", model=self.name, version=version)
            return "released"
        del model
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(gone.wait(), max(0.0, deadline - time.monotonic()))
        leftover = ref()
        if leftover is None:
            log.info("model_released", model=self.name, version=version)
            return "released"
        # frames that still reach it fail and are counted; memory does not grow per swap
        await asyncio.to_thread(leftover.close)
        log.warning("model_closed_while_referenced", model=self.name, version=version,
                    inflight=self.inflight(leftover))
        return "closed_while_referenced"

    # ------------------------------------------------------------------------- internals

    @staticmethod
    def _count(
        p: Probation, frames: int, error: BaseException | str | None
    ) -> tuple[Callable[..., None], tuple[Any, ...]] | None:
        p.seen += frames
        if error is not None:
            p.failed += frames
            text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
            p.errors.append(text[:300])
            if p.failed >= p.failures:
                p.done = True
                return (p.on_fail, (p.errors[-1],))
        if p.seen >= p.frames:
            p.done = True
            return (p.on_pass, ())
        return None

    def _call_soon(self, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        loop = self._loop
        if loop is None:
            fn(*args)
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            loop.call_soon(fn, *args)
        elif not loop.is_closed():
            loop.call_soon_threadsafe(fn, *args)
