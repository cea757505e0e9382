"""Camera capture: one thread per camera that keeps only the newest frame.

Cameras are slow, bursty and unreliable, and inference is slower than some of them; a queue
between them would grow without bound and serve ever older frames. So each camera has one
thread that reads (and, through the ``prepare`` hook, preprocesses) frames and hands each to a
``FrameConsumer`` that keeps one frame per camera: the newest wins and the one it replaces is
counted as dropped. A camera that fails, ends or stalls is reopened with the shared backoff
(``edge_agent.common.backoff``), independently of the others, and its state (connected, fps,
drops, last frame age) is readable at any time without locks.

Sources are URLs (``edge_agent.capture.sources``); a file can be played at its own frame rate, like
a camera, or read as fast as the consumer takes frames (no drops), optionally looping. With
motion gating on (``edge_agent.capture.motion``), a decoded frame in which nothing moved is not
handed over at all (counted as ``frames_still``), before any preprocessing is spent on it.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Literal, Protocol, TypeVar

import numpy as np
import structlog

from edge_agent.capture import motion
from edge_agent.capture.sources import CaptureError, Reader, open_source
from edge_agent.common import backoff
from edge_agent.config import CameraSettings

log = structlog.get_logger(__name__)

CameraState = Literal["connecting", "connected", "stalled", "reconnecting", "ended", "stopped"]
#: Every state, in the order metrics list them.
CAMERA_STATES: tuple[CameraState, ...] = (
    "connecting", "connected", "stalled", "reconnecting", "ended", "stopped",
)


# -------------------------------------------------------------------------------- the camera


#: What the consumer's ``prepare`` hook makes of a frame (capture never looks inside).
P = TypeVar("P")


def _stalled(silent_s: float) -> str:
    """``last_error`` of a stall, whichever noticed it (the watchdog or the read timeout)."""
    return f"stalled: no frame for {silent_s:.1f} s"


@dataclass(slots=True)
class Frame(Generic[P]):
    """One captured frame on its way to inference.

    ``image`` is the BGR frame; ``prepared`` is what the ``prepare`` hook made of it in the
    capture thread (for the streaming scheduler: the model it was preprocessed for, the input
    tensor and the geometry to undo it), opaque to capture.
    """

    camera: str
    #: Name of the model that serves this camera (``CameraSettings.model``).
    model_name: str
    #: Frames grabbed from the source before this one (since the camera started).
    index: int
    #: Capture time, Unix seconds (the result's ``ts``).
    ts: float
    #: Capture time, ``time.perf_counter()`` seconds (latencies are measured from it).
    t_read: float
    width: int
    height: int
    image: np.ndarray | None = None
    prepared: P | None = None
    preprocess_ms: float = 0.0


class FrameConsumer(Protocol):
    """Takes frames from capture threads (the scheduler)."""

    def offer(self, frame: Frame[Any], camera: Camera) -> None:
        """Keep ``frame`` as the camera's newest; count the frame it replaces as dropped."""
        ...

    def wait_room(self, camera: Camera, timeout: float) -> bool:
        """Block until the camera's previous frame was taken (True) or ``timeout`` passed."""
        ...


#: Fills ``frame.prepared`` from the BGR image (runs in the capture thread).
PrepareHook = Callable[[Frame[Any], np.ndarray], None]


class Camera:
    """A camera's capture thread and state.

    Counters are plain attributes written by one thread and read by others (single int stores
    are atomic under the GIL); ``dropped`` is written by the consumer under its own lock.
    """

    def __init__(
        self,
        settings: CameraSettings,
        consumer: FrameConsumer,
        prepare: PrepareHook | None = None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.name = settings.name
        self.spec = settings.source
        self._consumer = consumer
        self._prepare = prepare
        self._backoff = backoff.Backoff(settings.reconnect_min_s, settings.reconnect_max_s,
                                        (rng or random.Random()).random)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.state: CameraState = "connecting"
        self.state_since = time.monotonic()
        #: Frames grabbed from the source (fps-cap skips included).
        self.frames_read = 0
        #: Frames handed to the consumer.
        self.frames_delivered = 0
        #: Frames skipped by the fps cap (by design, not a loss).
        self.frames_skipped = 0
        #: Frames replaced by a newer one before inference took them, or refused (stale).
        self.dropped = 0
        #: Frames that could not be decoded or preprocessed.
        self.errors = 0
        self.reconnects = 0
        self.stalls = 0
        self.last_error: str | None = None
        #: ``time.monotonic()`` of the newest frame read, None before the first.
        self.last_frame_at: float | None = None
        self.fps = 0.0
        self.source_fps = 0.0
        self._fps_window = (time.monotonic(), 0)
        #: Motion gating (``settings.motion``), None when off; its counters are read by metrics.
        self.motion: motion.MotionGate | None = (
            motion.MotionGate(settings.motion) if settings.motion.enabled else None)

    # ------------------------------------------------------------------ control

    def start(self) -> None:
        """Start the capture thread (a daemon: a read stuck in a driver cannot block exit)."""
        self._thread = threading.Thread(target=self._run, name=f"capture[{self.name}]",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to stop; it exits after its current read."""
        self._stop.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread; True when it has ended."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        """The capture thread is running."""
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ state

    def _set_state(self, state: CameraState, **fields: Any) -> None:
        if state != self.state:
            self.state = state
            self.state_since = time.monotonic()
            log.info("camera_state", camera=self.name, state=state, **fields)

    def frame_age(self, now: float | None = None) -> float | None:
        """Seconds since the newest frame was read, None before the first frame."""
        if self.last_frame_at is None:
            return None
        return (time.monotonic() if now is None else now) - self.last_frame_at

    def delivering(self, within_s: float) -> bool:
        """Connected and a frame arrived within ``within_s`` seconds."""
        age = self.frame_age()
        return self.state == "connected" and age is not None and age <= within_s

    def check_stall(self, now: float | None = None) -> bool:
        """Mark the camera stalled when connected but silent for ``stall_timeout_s``.

        Called periodically from the event loop; the capture thread's blocked read is ended by
        the FFmpeg read timeout (the same duration) and the camera then reconnects.
        """
        now = time.monotonic() if now is None else now
        if self.state != "connected":
            return False
        since = self.last_frame_at if self.last_frame_at is not None else self.state_since
        since = max(since, self.state_since)
        if now - since <= self.settings.stall_timeout_s:
            return False
        self.stalls += 1
        # said here too, not only when the thread's read times out: a reader of the state
        # between the two must not see the stall with the previous outage's error
        self.last_error = _stalled(now - since)
        self._set_state("stalled", silent_s=round(now - since, 2))
        return True

    def current_fps(self) -> float:
        """Frames read per second over the last window; 0 when no frame came for 2 s."""
        age = self.frame_age()
        if age is None or age > 2.0:
            return 0.0
        if self.fps == 0.0:  # the first window is not complete yet: estimate from it
            start, count = self._fps_window
            elapsed = time.monotonic() - start
            return count / elapsed if count >= 2 and elapsed > 0 else 0.0
        return self.fps

    def snapshot(self) -> dict[str, Any]:
        """Plain-JSON state for ``/v1/cameras`` and telemetry."""
        age = self.frame_age()
        return {
            "name": self.name,
            "url": self.settings.display_url,  # never the camera's password
            "model": self.settings.model,
            "state": self.state,
            "connected": self.state == "connected",
            "fps": round(self.current_fps(), 2),
            "source_fps": self.source_fps,
            "frames_read": self.frames_read,
            "frames_delivered": self.frames_delivered,
            "frames_skipped": self.frames_skipped,
            "dropped": self.dropped,
            "errors": self.errors,
            "reconnects": self.reconnects,
            "stalls": self.stalls,
            "last_frame_age_s": None if age is None else round(age, 3),
            "last_error": self.last_error,
            "motion_gating": self.motion is not None,
            "frames_still": self.frames_still,
        }

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                outcome = self._connect_and_read()
                if outcome == "stopped" or self._stop.is_set():
                    break
                if outcome == "ended":
                    if not self.settings.loop:
                        self._set_state("ended")
                        return
                    continue  # reopen at once: a loop is not a failure
                delay = self._backoff.next_delay()
                self.reconnects += 1
                self._set_state("reconnecting", delay_s=round(delay, 2), error=self.last_error)
                if self._stop.wait(delay):
                    break
        except Exception as exc:  # a bug, not a camera fault: say so loudly, end the thread
            self.last_error = self.settings.redact(repr(exc))
            log.exception("camera_thread_crashed", camera=self.name)
            raise
        finally:
            if self.state != "ended":
                self._set_state("stopped")

    def _connect_and_read(self) -> Literal["stopped", "ended", "failed"]:
        s = self.settings
        if self.state != "reconnecting":
            self._set_state("connecting")
        try:
            reader = open_source(self.spec, open_timeout_s=s.open_timeout_s,
                                 read_timeout_s=s.stall_timeout_s, stop=self._stop)
        except CaptureError as exc:
            self.last_error = self.settings.redact(str(exc))
            return "failed"
        except Exception as exc:  # OpenCV raises cv2.error for some bad URLs
            self.last_error = self.settings.redact(f"cannot open source: {exc}")
            return "failed"
        self.source_fps = reader.fps
        try:
            return self._read_loop(reader)
        finally:
            reader.release()

    def _read_loop(self, reader: Reader) -> Literal["stopped", "ended", "failed"]:
        s = self.settings
        # a file played like a camera (``rate: native``) is paced; ``rate: max`` backpressures
        clock = _FileClock(reader.fps) if self.spec.kind == "file" and s.rate == "native" else None
        backpressure = self.spec.kind == "file" and s.rate == "max"
        cap = _FpsCap(s.fps_cap)
        gate = self.motion
        t0 = time.monotonic()
        got_any = False
        while not self._stop.is_set():
            if clock is not None and not clock.wait(self._stop):
                return "stopped"
            if not reader.grab():
                return self._read_failed(got_any, t0)
            now = self._frame_read(reader, first=not got_any)
            got_any = True
            if not cap.take(now):
                self.frames_skipped += 1
                continue
            img = reader.retrieve()
            if img is None:
                self.errors += 1
                continue
            if gate is not None and gate.check(img, self._gate_clock(reader)) == "still":
                continue  # nothing moved: no inference, counted in ``gate.still``
            self._deliver(img, backpressure)
        return "stopped"

    @property
    def frames_still(self) -> int:
        """Frames motion gating kept from inference (no motion, no keep-alive due)."""
        return self.motion.still if self.motion is not None else 0

    def _gate_clock(self, reader: Reader) -> float:
        """The keep-alive's clock: seconds of video for a file, so a replay at ``rate: max``
        gates like the camera did; the wall clock for live sources."""
        if self.spec.kind == "file":
            return self.frames_read / reader.fps
        return time.monotonic()

    def _frame_read(self, reader: Reader, *, first: bool) -> float:
        """Count a grabbed frame; the first of a connection marks the camera connected."""
        now = time.monotonic()
        self.frames_read += 1
        self.last_frame_at = now
        if first:
            self._backoff.reset()
            self._set_state("connected", source_fps=round(reader.fps, 2))
        elif self.state == "stalled":
            self._set_state("connected")
        self._count_fps(now)
        return now

    def _read_failed(self, got_any: bool, t0: float) -> Literal["stopped", "ended", "failed"]:
        """Classify a failed read: a stop, the end of a file, a stall or a failure."""
        if self._stop.is_set():
            return "stopped"
        if self.spec.kind == "file" and got_any:
            return "ended"
        silent = time.monotonic() - (self.last_frame_at or t0)
        if got_any and silent >= self.settings.stall_timeout_s * 0.9:
            # the FFmpeg read timeout ended a read that waited for a frame in vain
            if self.state != "stalled":
                self.stalls += 1
                self._set_state("stalled", silent_s=round(silent, 2))
            self.last_error = _stalled(silent)
        else:
            self.last_error = "read failed" if got_any else "no frame from source"
        return "failed"

    def _count_fps(self, now: float) -> None:
        start, count = self._fps_window
        count += 1
        if now - start >= 1.0:
            self.fps = count / (now - start)
            self._fps_window = (now, 0)
        else:
            self._fps_window = (start, count)

    def _deliver(self, img: np.ndarray, backpressure: bool) -> None:
        h, w = img.shape[:2]
        t_read = time.perf_counter()
        frame: Frame[Any] = Frame(self.name, self.settings.model, self.frames_read - 1,
                                  time.time(), t_read, w, h, img)
        if self._prepare is not None:
            try:
                self._prepare(frame, img)
            except Exception as exc:
                self.errors += 1
                message = self.settings.redact(str(exc))
                if self.last_error != message:
                    self.last_error = message
                    log.warning("frame_prepare_failed", camera=self.name, error=self.last_error)
                return
            frame.preprocess_ms = (time.perf_counter() - t_read) * 1000.0
        if backpressure:
            # a file read as fast as inference goes: wait for the slot rather than drop
            while not self._consumer.wait_room(self, 0.5):
                if self._stop.is_set():
                    return
        self._consumer.offer(frame, self)
        self.frames_delivered += 1


class _FileClock:
    """Plays a file like a camera: frame n is due at t0 + n / fps (no catch-up burst)."""

    def __init__(self, fps: float) -> None:
        self._period = 1.0 / fps
        self._t0 = time.monotonic()
        self._n = 0

    def wait(self, stop: threading.Event) -> bool:
        """Wait until the next frame is due; False when ``stop`` was set meanwhile."""
        delay = self._t0 + self._n * self._period - time.monotonic()
        if delay > 0:
            if stop.wait(delay):
                return False
        elif delay < -1.0:  # far behind: do not burst to catch up
            self._t0 = time.monotonic() - self._n * self._period
        self._n += 1
        return True


class _FpsCap:
    """``fps_cap``: takes at most one frame per period (0 = every frame)."""

    def __init__(self, fps_cap: float) -> None:
        self._period = 1.0 / fps_cap if fps_cap > 0 else 0.0
        self._next_due = 0.0

    def take(self, now: float) -> bool:
        """Whether the frame read at ``now`` is processed (False: skipped by the cap)."""
        if not self._period:
            return True
        if now < self._next_due:
            return False
        self._next_due = max(self._next_due + self._period, now - self._period)
        return True
