"""The streaming pipeline: cameras → scheduler → results on the event loop → result sink.

Threads do the heavy work (capture threads decode and preprocess, worker threads infer and
post-process); the event loop only receives finished results. Workers push results into a
deque and wake the loop with one ``call_soon_threadsafe`` per burst (not per frame); the loop
stamps each result's end-to-end latency and hands it to the sink. If the loop falls behind
(it should not: publishing is microseconds), at most ``max_pending_results`` wait and newer
ones are dropped and counted, so memory stays bounded even then.

The pipeline also answers the probes' questions: which cameras deliver (``/readyz``), whether
inference is stuck (``/healthz``), and watches for stalled cameras.

Each counter has one writer. The relay's per-camera and per-version counts are written on the
event loop only; its backlog drops, refused in whichever worker pushed, under the relay's lock.
The telemetry providers (``telemetry_models``, ``telemetry_cameras``) report what changed since
their previous call, so they have one caller, the telemetry task, which alone moves their
baselines; what the workers counted is read through ``Scheduler.tally()`` (a snapshot).
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import structlog
from prometheus_client import Histogram

from edge_agent.capture.camera import Camera, PrepareHook
from edge_agent.config import CameraSettings, PipelineSettings
from edge_agent.contract.protocol import CameraTelemetry, ModelTelemetry, ShadowTelemetry
from edge_agent.contract.telemetry import LayoutTelemetry
from edge_agent.streaming import outputs as windows
from edge_agent.streaming import scheduler as scheduling
from edge_agent.streaming.metrics import AgentMetrics
from edge_agent.streaming.sinks import ResultSink
from edge_agent.streaming.slots import ModelSlot

log = structlog.get_logger(__name__)

#: Seconds between stall checks of the cameras.
MONITOR_INTERVAL_S = 0.5

#: What a shadow runner reports each telemetry interval: per (model, *active* version), the
#: candidate's ``ShadowTelemetry`` since its previous call (one caller: ``telemetry_models``).
ShadowProvider = Callable[[], Mapping[tuple[str, str], ShadowTelemetry]]


class ResultRelay:
    """Carries results from worker threads to the sink on the event loop, in bursts."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sink: ResultSink,
        metrics: AgentMetrics,
        max_pending: int,
    ) -> None:
        self._loop = loop
        self._sink = sink
        self._metrics = metrics
        self._max_pending = max_pending
        self._queue: collections.deque[tuple[float, dict[str, Any]]] = collections.deque()
        self._scheduled = False
        self._drop_lock = threading.Lock()
        self._last_drop_log = 0.0  # guarded by _drop_lock
        self._e2e: dict[tuple[str, str], Histogram] = {}
        #: Results handed to the sink, per camera.
        self.published: collections.Counter[str] = collections.Counter()
        #: Per (model, version) since the last ``take_window``: results, their end-to-end
        #: latencies (a sketch) and output statistics, for telemetry.
        self._window: dict[tuple[str, str], windows.Window] = {}
        #: Results dropped because the loop fell behind (written under ``_drop_lock``).
        self.dropped = 0

    def push(self, items: list[tuple[float, dict[str, Any]]]) -> None:
        """Queue results (any thread) and wake the loop once per burst."""
        if len(self._queue) >= self._max_pending:
            self._drop(len(items))
            return
        self._queue.extend(items)
        if not self._scheduled:
            # the flag is cleared by ``drain`` *before* it empties the queue, so an item
            # appended while the flag still reads True is always seen by that drain
            self._scheduled = True
            try:
                self._loop.call_soon_threadsafe(self.drain)
            except RuntimeError:  # the loop is closed: we are shutting down
                self._scheduled = False

    def _drop(self, n: int) -> None:
        # a worker thread, and rare (the loop fell behind): the lock keeps one writer at a time
        self._metrics.results_dropped.labels("backlog").inc(n)
        with self._drop_lock:
            self.dropped += n
            total = self.dropped
            now = time.monotonic()
            if now - self._last_drop_log < 5.0:
                return
            self._last_drop_log = now
        log.warning("results_dropped", reason="backlog", total=total)

    def drain(self) -> None:
        """Publish everything queued (on the event loop thread)."""
        self._scheduled = False
        pop = self._queue.popleft
        publish = self._sink.publish
        perf = time.perf_counter
        published = self.published
        e2e_children = self._e2e
        window = self._window
        while True:
            try:
                t_read, res = pop()
            except IndexError:
                break
            e2e = perf() - t_read
            res["latency_ms"]["end_to_end"] = round(e2e * 1000.0, 3)
            ref = res["model"]
            key = (ref["name"], ref["version"])
            child = e2e_children.get(key)
            if child is None:
                child = e2e_children[key] = self._metrics.observers(*key).end_to_end
            child.observe(e2e)
            win = window.get(key)
            if win is None:
                win = window[key] = windows.Window()
            win.add(e2e * 1000.0, res)
            publish(res)
            published[res["camera"]] += 1

    @property
    def pending(self) -> int:
        """Results waiting for the loop."""
        return len(self._queue)

    def take_window(self) -> dict[tuple[str, str], windows.Window]:
        """Each model version's window (results, latency, outputs) since the last call."""
        window, self._window = self._window, {}  # both on the event loop thread: no lock
        return window


class Pipeline:
    """Owns the cameras, the scheduler and the relay; started and stopped by the agent."""

    def __init__(
        self,
        *,
        node: str,
        cameras: Sequence[CameraSettings],
        slots: Mapping[str, ModelSlot],
        sink: ResultSink,
        metrics: AgentMetrics,
        workers: int,
        batch_limits: dict[str, int] | None = None,
        settings: PipelineSettings | None = None,
    ) -> None:
        self.node = node
        self.slots = slots
        self.sink = sink
        self.metrics = metrics
        #: Its limits (``max_pending_results``, ``ready_frame_age_s``, ``stuck_after_s``).
        self.settings = settings or PipelineSettings()
        self._relay: ResultRelay | None = None
        self.scheduler = scheduling.Scheduler(node=node, slots=slots, workers=workers,
                                              emit=self._emit, metrics=metrics,
                                              batch_limits=batch_limits)
        self.cameras: dict[str, Camera] = {}
        for cs in cameras:
            slot = slots.get(cs.model)
            if slot is None:
                raise ValueError(f"camera {cs.name!r} uses unknown model {cs.model!r}")
            self.cameras[cs.name] = Camera(cs, self.scheduler, self._prepare_hook(slot))
        metrics.watch_cameras(lambda: list(self.cameras.values()))
        metrics.workers.set(workers)
        self._started = False
        self._errors_seen: Mapping[tuple[str, str], int] = {}
        self._drops_seen: dict[str, int] = {}
        self._still_seen: dict[str, int] = {}
        #: Set by whoever runs a candidate in shadow (``streaming.shadow``): its windows are
        #: attached to the active version's entry by ``telemetry_models``. None: no shadow.
        self.shadow_windows: ShadowProvider | None = None
        #: Set by the composition root: the serving layout of a model name, attached to its
        #: telemetry entries (``streaming.retune``). None: not reported.
        self.layout_info: Callable[[str], LayoutTelemetry | None] | None = None

    @staticmethod
    def _prepare_hook(slot: ModelSlot) -> PrepareHook:
        def prepare(frame: scheduling.StreamFrame, img: np.ndarray) -> None:
            model = slot.model
            if model is None:
                return  # no model yet: the scheduler counts the frame as dropped
            frame.prepared = scheduling.prepare(model, img)

        return prepare

    def _emit(self, items: list[tuple[float, dict[str, Any]]]) -> None:
        relay = self._relay
        if relay is not None:
            relay.push(items)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start the workers and the capture threads."""
        self._relay = ResultRelay(asyncio.get_running_loop(), self.sink, self.metrics,
                                  self.settings.max_pending_results)
        self.scheduler.start()
        for cam in self.cameras.values():
            cam.start()
        self._started = True
        log.info("pipeline_started", cameras=len(self.cameras), workers=self.scheduler.workers,
                 batch_limits=self.scheduler.batch_limits)

    async def run(self) -> None:
        """Watch the cameras for stalls until cancelled (the supervised ``pipeline`` task)."""
        while True:
            await asyncio.sleep(MONITOR_INTERVAL_S)
            now = time.monotonic()
            for cam in self.cameras.values():
                cam.check_stall(now)

    async def add_camera(self, cs: CameraSettings) -> None:
        """Start one more camera while running (a config reload, ``edge_agent.app.reload``)."""
        slot = self.slots.get(cs.model)
        if slot is None:
            raise ValueError(f"camera {cs.name!r} uses unknown model {cs.model!r}")
        if cs.name in self.cameras:
            raise ValueError(f"camera {cs.name!r} is already running")
        cam = Camera(cs, self.scheduler, self._prepare_hook(slot))
        self.cameras[cs.name] = cam
        if self._started:
            cam.start()

    async def remove_camera(self, name: str, timeout: float = 5.0) -> bool:
        """Stop one camera while the others keep streaming; False if it was not running."""
        cam = self.cameras.pop(name, None)
        if cam is None:
            return False
        cam.stop()
        if not await asyncio.to_thread(cam.join, timeout):
            log.warning("camera_stop_incomplete", camera=name)
        return True

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop the cameras, run what is already waiting, and hand every result to the sink."""
        if not self._started:
            return
        self._started = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for cam in self.cameras.values():
            cam.stop()

        def join_all() -> tuple[list[str], bool]:
            stuck = [c.name for c in self.cameras.values()
                     if not c.join(max(0.0, deadline - loop.time()) / 2)]
            ok = self.scheduler.stop(drain=True, timeout=max(0.0, deadline - loop.time()))
            return stuck, ok

        stuck, workers_done = await asyncio.to_thread(join_all)
        if self._relay is not None:
            self._relay.drain()
        if stuck or not workers_done:
            log.warning("pipeline_stop_incomplete", cameras_still_reading=stuck,
                        workers_done=workers_done)
        log.info("pipeline_stopped", results=sum(self.published.values()),
                 dropped=sum(c.dropped for c in self.cameras.values()))

    # ------------------------------------------------------------------ probes

    @property
    def published(self) -> Mapping[str, int]:
        """Results handed to the sink, per camera."""
        return self._relay.published if self._relay is not None else {}

    def delivering(self) -> list[str]:
        """Cameras that delivered a frame within ``ready_frame_age_s``."""
        age = self.settings.ready_frame_age_s
        return [c.name for c in self.cameras.values() if c.delivering(age)]

    def stuck(self) -> bool:
        """An inference has run longer than ``stuck_after_s``."""
        return self.scheduler.stuck_for() > self.settings.stuck_after_s

    def telemetry_models(self) -> list[ModelTelemetry]:
        """Per model version since the previous call: frames, errors, latency, outputs, shadow.

        ``latency_ms`` (percentiles, for hubs before the sketch) and ``latency`` (the sketch)
        describe the same end-to-end latencies; a candidate in shadow rides on the active
        version's entry. The telemetry task's provider: each call moves the baselines (one
        caller), and takes the shadow runner's window too.
        """
        window = self._relay.take_window() if self._relay is not None else {}
        shadow = self._take_shadow()
        errors = self.scheduler.tally().errors_by_model
        keys = (set(window) | set(shadow)
                | {k for k, v in errors.items() if v != self._errors_seen.get(k, 0)})
        out = []
        for key in sorted(keys):
            errs = errors.get(key, 0) - self._errors_seen.get(key, 0)
            win = window.get(key) or windows.Window()  # errors or a shadow only: no frames
            out.append(ModelTelemetry(
                name=key[0], version=key[1], frames=win.frames, errors=errs,
                latency_ms=win.latency_summary(), latency=win.latency_wire(),
                outputs=win.output_stats(), shadow=shadow.get(key),
                layout=self.layout_info(key[0]) if self.layout_info is not None else None))
        self._errors_seen = errors
        return out

    def _take_shadow(self) -> Mapping[tuple[str, str], ShadowTelemetry]:
        provider = self.shadow_windows
        if provider is None:
            return {}
        try:
            return provider()
        except Exception as exc:  # the rest of the message still goes out; this window is lost
            log.error("shadow_telemetry_failed", error=repr(exc)[:200])
            return {}

    def telemetry_cameras(self) -> list[CameraTelemetry]:
        """Per camera: connected, fps, and frames dropped and held back by motion gating
        since the previous call (one caller)."""
        out = []
        for cam in list(self.cameras.values()):
            dropped, still = cam.dropped, cam.frames_still
            out.append(CameraTelemetry(camera=cam.name, connected=cam.state == "connected",
                                       fps=round(cam.current_fps(), 2),
                                       drops=dropped - self._drops_seen.get(cam.name, 0),
                                       frames_still=still - self._still_seen.get(cam.name, 0)))
            self._drops_seen[cam.name] = dropped
            self._still_seen[cam.name] = still
        return out

    def camera_snapshots(self) -> list[dict[str, Any]]:
        """Each camera's state plus the results it produced."""
        pub = self.published
        out = []
        for cam in self.cameras.values():
            snap = cam.snapshot()
            snap["results"] = pub.get(cam.name, 0)
            out.append(snap)
        return out
