"""Shadow runs: a candidate version sees a sample of the frames the active version serves.

Before a rollout switches a model to a new version it can ask each node to run the candidate
*in shadow* (``DesiredModel.shadow``): model sync loads and checks it like any version, then
hands it here (``ShadowRunner.swap``). It never serves: nothing it outputs reaches a sink. After
a worker produced the active version's output for a frame, ``after_batch`` may hand the raw
frame and that output to one shadow thread, which preprocesses the frame per the candidate's own
manifest, infers, post-processes and scores how far the two answers agree (``agreement``; the
contract is ``contract.telemetry.ShadowTelemetry``).

Cost is bounded twice. The hand-off holds one frame: a frame offered while the shadow thread is
busy, or while its budget is spent, is counted as ``skipped`` and never queued. The budget is a
token bucket in seconds: every active batch of a model that has a candidate credits
``max_slowdown`` times its measured busy seconds, every shadow sample debits what it took, and
a frame is handed over only while the balance is positive. So over any window the shadow's busy
time stays below ``max_slowdown`` x the active version's plus one sample (the balance may go
negative by one sample's cost, the bucket holds at most ``BURST_S`` x ``max_slowdown``), and on
a machine whose cores the workers keep busy the active throughput drops by at most about that
fraction (``bench/shadow.py`` measures it).

A comparison is dropped when the active version changed between the hand-off and the shadow
thread taking it (a swap: the answer belongs to a version no longer serving); the window's
figures are kept per active (model, version), so two versions' samples never mix.

Threads: workers call ``after_batch`` (one lock per batch, nothing when no candidate is
loaded); the shadow thread writes the sample figures under the same lock; the telemetry task
calls ``take_window`` (one caller, it moves the window).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog

from edge_agent.contract.telemetry import ShadowTelemetry
from edge_agent.errors import ModelError
from edge_agent.streaming.slots import ModelSlot, ServingModel

log = structlog.get_logger(__name__)

#: Seconds of active busy time whose credit the bucket can hold (after an idle spell the shadow
#: may catch up by at most ``BURST_S`` x ``max_slowdown`` seconds of work).
BURST_S = 2.0
#: IoU two boxes need to count as the same object.
MATCH_IOU = 0.5
#: Seconds between ``shadow_inference_failed`` lines while failures go on (one line per burst).
ERROR_LOG_INTERVAL_S = 5.0


# ------------------------------------------------------------------------------ agreement


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    if union <= 0.0:  # zero-area boxes (clipped at the frame's edge): equal or not at all
        return 1.0 if list(a) == list(b) else 0.0
    return inter / union


def box_f1(active: Sequence[Mapping[str, Any]], candidate: Sequence[Mapping[str, Any]]) -> float:
    """F1 of the boxes matched one-to-one (same label, IoU >= ``MATCH_IOU``); 1 when both empty.

    Pairs are matched greedily, highest IoU first, so each box counts at most once.
    """
    if not active and not candidate:
        return 1.0
    pairs = sorted(
        ((_iou(a["box"], c["box"]), i, j)
         for i, a in enumerate(active) for j, c in enumerate(candidate)
         if a["label"] == c["label"]),
        reverse=True)
    used_a: set[int] = set()
    used_c: set[int] = set()
    for iou, i, j in pairs:
        if iou < MATCH_IOU:
            break
        if i not in used_a and j not in used_c:
            used_a.add(i)
            used_c.add(j)
    return 2.0 * len(used_a) / (len(active) + len(candidate))


def agreement(active: Mapping[str, Any], candidate: Mapping[str, Any]) -> float:
    """How far a candidate's output agrees with the active version's on one frame, in [0, 1].

    Classification (``classes``): 1 when the top-1 labels are equal. Detection and faces
    (``detections``): ``box_f1``. Outputs of different kinds agree not at all (0).
    """
    if "classes" in active and "classes" in candidate:
        a, c = active["classes"], candidate["classes"]
        if not a or not c:
            return 1.0 if not a and not c else 0.0
        return 1.0 if a[0]["label"] == c[0]["label"] else 0.0
    if "detections" in active and "detections" in candidate:
        return box_f1(active["detections"], candidate["detections"])
    return 0.0


# ------------------------------------------------------------------------------- the runner


@dataclass(slots=True)
class _Window:
    """One active (model, version)'s shadow figures since the last ``take_window``."""

    candidate: str
    samples: int = 0
    agreement_sum: float = 0.0
    errors: int = 0
    skipped: int = 0
    busy_s: float = 0.0
    active_busy_s: float = 0.0

    def wire(self) -> ShadowTelemetry:
        return ShadowTelemetry(version=self.candidate, samples=self.samples,
                               agreement_sum=round(self.agreement_sum, 6), errors=self.errors,
                               skipped=self.skipped, busy_s=round(self.busy_s, 6),
                               active_busy_s=round(self.active_busy_s, 6))


@dataclass(frozen=True, slots=True)
class _Job:
    """A frame handed to the shadow thread with the active version's answer for it."""

    model: str
    active_version: str
    image: np.ndarray
    output: Mapping[str, Any]


@dataclass(slots=True)
class Counts:
    """Totals since start (tests, logs): frames compared, failed, skipped, dropped by a swap."""

    samples: int = 0
    errors: int = 0
    skipped: int = 0
    swap_dropped: int = 0
    #: The longest one sample took, seconds (the budget may overshoot by one sample).
    max_sample_s: float = 0.0
    by_candidate: dict[str, int] = field(default_factory=dict)


class ShadowRunner:
    """The candidates in shadow, their budget and the one thread that runs them."""

    def __init__(self, active: Mapping[str, ModelSlot], *, max_slowdown: float = 0.10) -> None:
        if not 0.0 < max_slowdown < 1.0:
            raise ValueError("max_slowdown must be in (0, 1)")
        #: The active slots (a comparison is dropped when its version no longer serves).
        self.active = active
        self.max_slowdown = max_slowdown
        #: One slot per model name with a candidate loaded (leases keep a session open while
        #: the shadow thread runs it; ``retire`` releases a replaced one).
        self.slots: dict[str, ModelSlot] = {}
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._job: _Job | None = None  # the hand-off (one frame)
        self._running = False  # the shadow thread is on a sample
        self._tokens = 0.0  # seconds of shadow work allowed now
        self._windows: dict[tuple[str, str], _Window] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._last_error_log = 0.0
        self._errors_since_log = 0
        #: Totals since start (under the lock).
        self.counts = Counts()

    # ---------------------------------------------------------------------- model sync side

    def swap(self, name: str, model: ServingModel | None) -> ServingModel | None:
        """Make ``model`` the candidate of ``name`` (None: no candidate); return the old one.

        The caller retires the returned model (``retire``) once no sample uses it.
        """
        slot = self.slots.get(name)
        if slot is None:
            if model is None:
                return None
            slot = self.slots[name] = ModelSlot(f"shadow.{name}")
        with contextlib.suppress(RuntimeError):  # ``retire``'s idle events: the caller's loop
            slot.bind_loop(asyncio.get_running_loop())
        old = slot.swap(model)
        if model is not None:
            self._ensure_thread()
        return old

    async def retire(self, name: str, box: list[ServingModel], timeout: float) -> str | None:
        """Release a candidate ``swap`` replaced (popped from ``box``) once no sample uses it;
        ``ModelSlot.retire``'s outcome."""
        slot = self.slots.get(name)
        if slot is None:  # never swapped in here: nothing can use it
            while box:
                box.pop().close()
            return None
        return await slot.retire(box, timeout)

    def has_candidate(self, name: str) -> bool:
        """Whether ``name`` has a candidate loaded (any thread; a dict lookup)."""
        slot = self.slots.get(name)
        return slot is not None and slot.model is not None

    def candidate(self, name: str) -> str | None:
        """The candidate version loaded for ``name``."""
        slot = self.slots.get(name)
        return None if slot is None else slot.version

    def close(self, timeout: float = 5.0) -> None:
        """Stop the shadow thread and close every candidate's session (shutdown)."""
        with self._lock:
            self._stopping = True
            self._job = None
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        for slot in self.slots.values():
            old = slot.swap(None)
            if old is not None:
                old.close()

    # ------------------------------------------------------------------------ worker side

    def after_batch(
        self,
        model: ServingModel,
        frames: Sequence[tuple[np.ndarray | None, Mapping[str, Any]]],
        busy_s: float,
    ) -> None:
        """A worker ran ``frames`` (image, active output) on ``model`` in ``busy_s`` seconds.

        Credits the budget and offers the frames: at most one is handed over, the rest are
        counted as skipped. A no-op (one dict lookup) for a model without a candidate.
        """
        slot = self.slots.get(model.name)
        candidate = None if slot is None else slot.version
        if candidate is None:
            return
        key = (model.name, str(model.version))
        with self._lock:
            win = self._windows.get(key)
            if win is None or win.candidate != candidate:
                win = self._windows[key] = _Window(candidate)
            win.active_busy_s += busy_s
            cap = BURST_S * self.max_slowdown
            self._tokens = min(cap, self._tokens + self.max_slowdown * busy_s)
            for image, output in frames:
                if (self._job is None and not self._running and self._tokens > 0.0
                        and image is not None and not self._stopping):
                    self._job = _Job(model.name, key[1], image, output)
                    self._cond.notify()
                else:
                    win.skipped += 1
                    self.counts.skipped += 1

    # ------------------------------------------------------------------------ telemetry side

    def take_window(self) -> dict[tuple[str, str], ShadowTelemetry]:
        """Per active (model, version): the shadow's figures since the previous call."""
        with self._lock:
            windows, self._windows = self._windows, {}
        return {k: w.wire() for k, w in windows.items()}

    # ------------------------------------------------------------------------ shadow thread

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is not None or self._stopping:
                return
            self._thread = threading.Thread(target=self._loop, name="shadow", daemon=True)
        self._thread.start()

    def _take(self) -> _Job | None:
        with self._lock:
            while self._job is None and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            job, self._job = self._job, None
            self._running = True
            return job

    def _loop(self) -> None:
        while True:
            job = self._take()
            if job is None:
                return
            try:
                self._sample(job)
            finally:
                with self._lock:
                    self._running = False

    def _sample(self, job: _Job) -> None:
        active = self.active.get(job.model)
        slot = self.slots.get(job.model)
        if active is None or active.version != job.active_version or slot is None:
            with self._lock:  # the active version was swapped since the hand-off
                self.counts.swap_dropped += 1
            return
        try:
            model = slot.acquire()
        except ModelError:  # unloaded since the hand-off
            return
        version = str(model.version)
        t0 = time.perf_counter()
        score: float | None = None
        error: str | None = None
        try:
            tensor, meta = model.preprocess(job.image)
            out = model.postprocess(model.run(tensor), [meta])[0]
            score = agreement(job.output, out)
        except Exception as exc:  # the candidate failed on this frame: counted, never compared
            error = f"{type(exc).__name__}: {exc}"[:300]
        finally:
            slot.release(model, None)
            del model
        spent = time.perf_counter() - t0
        self._record(job, version, spent, score, error)

    def _record(self, job: _Job, version: str, spent: float, score: float | None,
                error: str | None) -> None:
        key = (job.model, job.active_version)
        with self._lock:
            self._tokens -= spent
            self.counts.max_sample_s = max(self.counts.max_sample_s, spent)
            win = self._windows.get(key)
            if win is None or win.candidate != version:
                win = self._windows[key] = _Window(version)
            win.busy_s += spent
            if score is not None:
                win.samples += 1
                win.agreement_sum += score
                self.counts.samples += 1
                self.counts.by_candidate[version] = self.counts.by_candidate.get(version, 0) + 1
                return
            win.errors += 1
            self.counts.errors += 1
            self._errors_since_log += 1
            now = time.monotonic()
            if now - self._last_error_log < ERROR_LOG_INTERVAL_S:
                return
            self._last_error_log = now
            frames, self._errors_since_log = self._errors_since_log, 0
        log.warning("shadow_inference_failed", model=job.model, version=version,
                    active_version=job.active_version, frames=frames, error=error)
