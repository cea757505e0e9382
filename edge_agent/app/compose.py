"""The composition root: settings → models → cameras → pipeline → result sink → HTTP.

Everything the agent runs is built here, once, from one ``AgentSettings``, and handed to the
``Supervisor`` as named tasks and ordered shutdown steps. Nothing else in the package reads
settings globally or starts threads on import, so tests can build several agents in one process
and the benchmark can drive the same agent the DaemonSet runs, with its own sink.

Shutdown order (SIGTERM): the pipeline stops its cameras and finishes the frames already taken
(their results reach the sink), then the sink flushes (the outbox commits), then HTTP stops, then
the sessions are released, all within ``shutdown_timeout_s``.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import gc
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog
from prometheus_client import CollectorRegistry

from edge_agent.app import images
from edge_agent.app.http import HttpServer, open_server
from edge_agent.app.supervisor import LoopLagProbe, Supervisor
from edge_agent.common import httpserver
from edge_agent.config import AgentSettings, ConfigError, check_settings
from edge_agent.contract import results
from edge_agent.errors import InputError, ModelError
from edge_agent.streaming import calibration, retune
from edge_agent.streaming.metrics import AgentMetrics
from edge_agent.streaming.pipeline import Pipeline
from edge_agent.streaming.shadow import ShadowRunner
from edge_agent.streaming.sinks import JsonLinesSink, ResultSink
from edge_agent.streaming.slots import ModelSlot, ServingModel
from edge_agent.tracking import setup as tracking

if TYPE_CHECKING:  # heavy (onnxruntime, the cache, paho): imported where they are first built
    from edge_agent.app.reload import ConfigReloader
    from edge_agent.identity.keeper import IdentityKeeper
    from edge_agent.inference.engine import InferOutput
    from edge_agent.modelsync.sync import ModelSync
    from edge_agent.outbox.facade import Outbox
    from edge_agent.transport.drain import Drain
    from edge_agent.transport.link import MqttLink

log = structlog.get_logger(__name__)

#: Uploads to ``/v1/infer`` read, waiting or running at once; more get 429. With one infer
#: thread, at most one is decoded at a time; the others hold at most their raw bytes.
MAX_HTTP_INFERS = 4
#: Stored calibrations, in ``hub.cache_dir`` (the agent's volume, beside the model cache).
CALIBRATION_FILE = "calibration.json"
#: ``/healthz`` fails when the loop-lag probe has not ticked for this long, seconds.
LOOP_STALL_S = 5.0


class Agent:
    """One agent: build with settings, then ``await run()`` (or ``start``/``stop`` in tests)."""

    def __init__(
        self,
        settings: AgentSettings,
        *,
        sink: ResultSink | None = None,
        registry: CollectorRegistry | None = None,
        config_path: Path | None = None,
    ) -> None:
        check_settings(settings)
        self.settings = settings
        #: The YAML file a reload (SIGHUP or file change) re-reads; None disables reloads.
        self.config_path = config_path
        self.reloader: ConfigReloader | None = None
        self.metrics = AgentMetrics(registry)
        self.metrics.watch_provider_fallbacks()
        self.slots: dict[str, ModelSlot] = {}
        for name in sorted({m.name for m in settings.models}
                           | {c.model for c in settings.cameras}):
            self.slots[name] = ModelSlot(name)
        self.sink: ResultSink | None = sink
        self._own_sink = sink is None
        self.supervisor = Supervisor(shutdown_timeout_s=settings.shutdown_timeout_s)
        self.lag = LoopLagProbe()
        self.lag.observe(self.metrics.loop_lag.observe)
        self.pipeline: Pipeline | None = None
        self.http: HttpServer | None = None
        self.sync: ModelSync | None = None
        #: This node's certificate, asked of the hub and renewed (``identity.bootstrap``).
        self.identity: IdentityKeeper | None = None
        #: Tracks, events and zones in front of the outbox (``pipeline.sink: mqtt``).
        self.tracking: tracking.TrackingSink | None = None
        #: The outbox, MQTT link, drain and telemetry (``pipeline.sink: mqtt``).
        self.mqtt: MqttParts | None = None
        #: Startup measurement figures (frames per second per candidate, per model).
        self.calibration: dict[str, dict[str, float]] = {}
        #: Layouts per model: stored ones reused at start and measured again in the background.
        #: Candidates run in shadow beside the active versions (loaded by model sync, fed by
        #: the scheduler's workers, reported with the active version's telemetry).
        self.shadow = ShadowRunner(self.slots,
                                   max_slowdown=settings.model_sync.shadow_max_slowdown)
        self.calibrator = calibration.Calibrator(
            calibration.Store(Path(settings.hub.cache_dir) / CALIBRATION_FILE),
            seconds=settings.pipeline.calibrate_s,
            floor=settings.pipeline.workers or settings.engine.concurrency or 1)
        #: The live re-evaluation of measured layouts (``pipeline.retune``); None when off.
        self.retuner: retune.Retuner | None = None
        self._batch_cands: dict[str, list[int]] = {}
        self._infer_pool = concurrent.futures.ThreadPoolExecutor(1, "http-infer")
        self._started = False

    # ------------------------------------------------------------------ building

    async def _load_models(self) -> None:
        from edge_agent.modelsync.sync import ModelSync  # noqa: PLC0415 - keeps import cheap

        # its constructor reads the sync state file: not on the event loop
        sync = self.sync = await asyncio.to_thread(ModelSync, self.settings, self.slots,
                                                   shadow=self.shadow)
        await sync.load_startup()  # raises ModelError for a config model that cannot load
        loaded = [s.model for s in self.slots.values() if s.model is not None]
        self.metrics.set_model_info(loaded)

    def _choose_concurrency(self) -> tuple[int, dict[str, int]]:
        """Workers and per-model batch limits: from the config, else measured (in a thread)."""
        p = self.settings.pipeline
        cams = collections.Counter(c.model for c in self.settings.cameras)
        fixed_workers = p.workers or self.settings.engine.concurrency
        workers = fixed_workers or 1
        limits: dict[str, int] = {}
        for name, slot in self.slots.items():
            model = slot.model
            if model is None or cams[name] == 0:
                continue
            batches = [1]
            if model.batch_dynamic and cams[name] > 1:
                batches = [p.max_batch] if p.max_batch else sorted(
                    {1, min(2, cams[name]), min(4, cams[name])})
            if fixed_workers and len(batches) == 1:
                limits[name] = batches[0]
                continue
            cands = [fixed_workers] if fixed_workers else calibration.worker_candidates()
            layout = self.calibrator.choose(name, model, cands, batches)
            self.calibration[name] = layout.figures
            limits[name] = layout.max_batch
            self._batch_cands[name] = batches
        return max(workers, self.calibrator.workers), limits

    def _adopt_layout(self, name: str, layout: calibration.Layout) -> None:
        """The background re-measurement beat a stored layout by the margin: run it now."""
        if self.pipeline is None:
            return
        self.calibration[name] = layout.figures
        self.pipeline.scheduler.set_batch_limit(name, layout.max_batch)
        self.pipeline.scheduler.resize(self.calibrator.workers)
        self.metrics.workers.set(self.calibrator.workers)
        if self.retuner is not None:
            self.retuner.adopted(self.calibrator.workers, layout.max_batch, layout.figures,
                                 layout.measured_at)

    async def _open_sink(self) -> ResultSink:
        p = self.settings.pipeline
        if p.sink == "jsonl":
            try:
                return await JsonLinesSink(p.jsonl_path, append=True).open()
            except OSError as exc:
                raise ConfigError([("pipeline.jsonl_path",
                                    f"cannot open for appending: {exc.strerror or exc}",
                                    str(p.jsonl_path))]) from exc
        self.mqtt = await MqttParts.open(self.settings, self.metrics)
        self.tracking = await tracking.wrap(self.mqtt.outbox, self.mqtt.link, self.settings,
                                            lambda: self.settings.cameras)
        return self.tracking

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Load models, measure, open the sink, start cameras and HTTP, spawn the tasks."""
        t0 = time.perf_counter()
        s = self.settings
        import cv2  # noqa: PLC0415 - heavy; only a running agent needs it

        # parallelism comes from one thread per camera and per worker; OpenCV's own pool
        # inside each resize would only oversubscribe the cores those threads already use
        cv2.setNumThreads(1)
        self._register_shutdown()
        await self._ensure_identity()  # model downloads and MQTT present it
        await self._load_models()
        workers, limits = await asyncio.to_thread(self._choose_concurrency)
        if self.sink is None:
            self.sink = await self._open_sink()
        self.pipeline = Pipeline(
            node=s.node, cameras=s.cameras, slots=self.slots, sink=self.sink,
            metrics=self.metrics, workers=workers, batch_limits=limits, settings=s.pipeline,
        )
        self.pipeline.scheduler.shadow = self.shadow
        if self.tracking is not None:  # frames for snapshot crops (cameras that take them)
            self.pipeline.scheduler.keep_image = self.tracking.wants_image
        self.pipeline.shadow_windows = self.shadow.take_window
        await self._start_retune()
        await self.pipeline.start()
        sup = self.supervisor
        sup.spawn("pipeline", self.pipeline.run())
        if self.identity is not None:
            sup.spawn("identity", self.identity.run())
        sup.spawn("loop-lag", self.lag.run())
        if self.sync is not None:
            sup.spawn("model-sync", self.sync.run())
        if self.config_path is not None:
            from edge_agent.app.reload import ConfigReloader  # noqa: PLC0415

            self.reloader = ConfigReloader(self, self.config_path)
            sup.spawn("config-reload", self.reloader.run(), root=False)
        if self.mqtt is not None:
            self.mqtt.attach(self, sup)
        if s.http.port:
            await self._start_http()
        # everything allocated so far (modules, sessions, settings) lives as long as the
        # process: keep it out of the cyclic GC, so a full collection scans only per-frame
        # garbage and takes microseconds instead of tens of milliseconds of loop and GIL time
        gc.freeze()
        self._started = True
        self.calibrator.start_recheck(self.slots, self._adopt_layout)
        log.info("agent_started", node=s.node, cameras=len(s.cameras), workers=workers,
                 batch_limits=limits, startup_s=round(time.perf_counter() - t0, 2))

    async def _start_http(self) -> None:
        s = self.settings
        self.http = await open_server(self, s.http, s.secret_files, MAX_HTTP_INFERS)
        self.metrics.registry.register(httpserver.StatsCollector(self.http.gate.stats,
                                                                 "edge_agent"))
        await self.http.start()

    async def _ensure_identity(self) -> None:
        if not self.settings.identity.bootstrap:
            return
        from edge_agent.identity.keeper import IdentityKeeper  # noqa: PLC0415

        self.identity = IdentityKeeper(self.settings, on_renewed=self._identity_renewed)
        await self.identity.ensure()

    async def _identity_renewed(self) -> None:
        """The MQTT link reconnects with the renewed certificate (results wait in the outbox;
        model downloads read the files anew each time)."""
        if self.mqtt is not None:
            await asyncio.to_thread(self.mqtt.link.reconnect_with_new_identity_sync)

    def _register_shutdown(self) -> None:
        """The shutdown steps, in order, registered before anything starts: each closes only
        what exists, so a start-up that fails half-way still releases what it opened."""
        for name, fn in (("calibration", self._stop_calibration),
                         ("pipeline", self._stop_pipeline), ("outbox-drain", self._stop_drain),
                         ("sink", self._close_sink), ("mqtt", self._close_link),
                         ("http", self._close_http), ("models", self._close_models)):
            self.supervisor.on_shutdown(name, fn)

    async def _start_retune(self) -> None:
        """Re-evaluate the measured layouts while serving (not a root task: serving goes on).
        Built in a thread: it reads the cgroup's CPU quota and the CPU times from files."""
        p, pipeline = self.settings.pipeline, self.pipeline
        if pipeline is None or p.workers or self.settings.engine.concurrency:
            return
        self.retuner = await asyncio.to_thread(
            retune.for_agent, p, pipeline.scheduler, self.calibrator, self._batch_cands,
            dropped=lambda: sum(c.dropped for c in list(pipeline.cameras.values())),
            metrics=self.metrics)
        if self.retuner is not None:
            pipeline.layout_info = self.retuner.telemetry
            self.supervisor.spawn("layout", self.retuner.run(), root=False)

    async def _stop_calibration(self) -> None:
        if self.retuner is not None:
            self.retuner.stop()
        await self.calibrator.aclose(self.settings.shutdown_timeout_s * 0.1)

    async def _stop_pipeline(self) -> None:
        if self.pipeline is not None:
            await self.pipeline.stop(self.settings.shutdown_timeout_s * 0.5)
        if self.tracking is not None:  # end open tracks while the drain can still send them
            self.tracking.stop_all()
            if self.mqtt is not None:
                await asyncio.to_thread(self._send_track_ends, self.mqtt,
                                        min(2.0, self.settings.shutdown_timeout_s * 0.1))

    @staticmethod
    def _send_track_ends(mqtt: MqttParts, timeout: float) -> None:
        """Commit the ``stopped`` ends and let the drain publish them before it stops claiming
        (bounded: with the broker away they wait in the outbox for the next process)."""
        deadline = time.monotonic() + timeout
        if not mqtt.outbox.flush(timeout) or not mqtt.link.connected:
            return
        while mqtt.outbox.depth > 0 and time.monotonic() < deadline:
            mqtt.drain.wait_idle(0.05)
            time.sleep(0.01)  # a polled bound on a shutdown path, not a test wait

    async def _stop_drain(self) -> None:
        if self.mqtt is not None:
            await self.mqtt.drain.aclose(self.settings.shutdown_timeout_s * 0.2)

    async def _close_sink(self) -> None:
        if self._own_sink and self.sink is not None:
            await self.sink.aclose()

    async def _close_link(self) -> None:
        if self.mqtt is not None:
            await self.mqtt.link.aclose()

    async def _close_http(self) -> None:
        if self.http is not None:
            await self.http.aclose()

    async def _close_models(self) -> None:
        await asyncio.to_thread(self.shadow.close)
        self._infer_pool.shutdown(wait=False, cancel_futures=True)
        for slot in self.slots.values():
            old = slot.swap(None)
            if old is not None:
                old.close()

    async def run(self, *, install_signals: bool = True) -> int:
        """Start, serve until SIGTERM/SIGINT or a root task dies; return the exit status."""
        try:
            try:
                await self.start()
            except BaseException:
                await self.supervisor.shutdown()
                raise
            if install_signals:
                self.supervisor.install_signal_handlers()
                if self.reloader is not None:
                    self.reloader.install_sighup()
            return await self.supervisor.run()
        finally:
            # whatever happened, no upload thread outlives the agent
            self._infer_pool.shutdown(wait=False, cancel_futures=True)

    async def stop(self) -> None:
        """Graceful stop (what SIGTERM does), for tests and embedding."""
        self.supervisor.request_stop("stop() called")
        await self.supervisor.shutdown()

    # ------------------------------------------------------------------ AgentView (HTTP)

    @property
    def registry(self) -> CollectorRegistry:
        """The Prometheus registry of this agent."""
        return self.metrics.registry

    def health(self) -> tuple[bool, list[str]]:
        """Alive: the loop ticks, no inference is wedged, the root tasks run."""
        reasons: list[str] = []
        silent = time.monotonic() - self.lag.last_tick
        if self._started and silent > LOOP_STALL_S:
            reasons.append(f"event loop did not tick for {silent:.1f} s")
        if self.pipeline is not None and self.pipeline.stuck():
            reasons.append(
                f"an inference has run for {self.pipeline.scheduler.stuck_for():.0f} s")
        for name, task in self.supervisor.tasks.items():
            if task.done() and not self.supervisor.stopping:
                reasons.append(f"task {name} ended")
        return not reasons, reasons

    def readiness(self) -> tuple[bool, list[str]]:
        """Ready: a model is loaded and warmed, and a camera delivers (when any is configured)."""
        reasons: list[str] = []
        if not self._started:
            reasons.append("starting")
        if self.supervisor.stopping:
            reasons.append("shutting down")
        if not any(s.model is not None for s in self.slots.values()):
            reasons.append("no model loaded")
        if self.settings.cameras and self.pipeline is not None and not self.pipeline.delivering():
            reasons.append("no camera delivers frames")
        return not reasons, reasons

    def models_info(self) -> list[dict[str, Any]]:
        """Each model slot: what serves, its status, providers and batching."""
        states = {}
        if self.sync is not None:
            states = {st.name: st for st in self.sync.model_states()}
        limits = self.pipeline.scheduler.batch_limits if self.pipeline is not None else {}
        out = []
        for name, slot in sorted(self.slots.items()):
            m = slot.model
            st = states.get(name)
            item: dict[str, Any] = {
                "name": name,
                "version": None if m is None else m.version,
                "status": st.status if st is not None else ("active" if m else "failed"),
                "error": None if st is None else st.error,
            }
            if m is not None:
                item.update(sha256=m.sha256, task=m.task, providers=list(m.providers),
                            batch_dynamic=m.batch_dynamic, max_batch=limits.get(name, 1))
            out.append(item)
        return out

    def cameras_info(self) -> list[dict[str, Any]]:
        """Each camera's state, counters and results."""
        return [] if self.pipeline is None else self.pipeline.camera_snapshots()

    async def infer_upload(self, data: bytes, model: str | None,
                           max_pixels: int) -> dict[str, Any]:
        """Decode and run one uploaded image on ``model`` (or the only model) in the HTTP infer
        thread: one at a time, so at most one upload is ever decoded in memory."""
        if model is None:
            if len(self.slots) != 1:
                raise LookupError(f"say which model with ?model=NAME (one of {sorted(self.slots)})")
            model = next(iter(self.slots))
        slot = self.slots.get(model)
        if slot is None:
            raise LookupError(f"unknown model {model!r}")
        loop = asyncio.get_running_loop()
        m, out, (h, w) = await loop.run_in_executor(self._infer_pool, _decode_and_infer, slot,
                                                    data, max_pixels)
        lat = results.latencies(preprocess=out.preprocess_ms, inference=out.inference_ms,
                                postprocess=out.postprocess_ms)
        # an upload belongs to no camera stream: no camera, capture or sink stage
        return results.build_result(node=self.settings.node, camera=None, ts=time.time(),
                                    model=m, width=w, height=h, latency_ms=lat,
                                    output=out.output)


@dataclass
class MqttParts:
    """The durable outbox, the MQTT link, the outbox drain and telemetry, wired together."""

    settings: AgentSettings
    outbox: Outbox
    link: MqttLink
    drain: Drain

    @classmethod
    async def open(cls, settings: AgentSettings, metrics: AgentMetrics) -> MqttParts:
        """Open the outbox (in a thread) and start connecting (the broker may be down)."""
        from edge_agent import __version__  # noqa: PLC0415
        from edge_agent.outbox.facade import Outbox  # noqa: PLC0415
        from edge_agent.transport import metrics as metrics_outbox  # noqa: PLC0415
        from edge_agent.transport.drain import Drain  # noqa: PLC0415
        from edge_agent.transport.link import MqttLink  # noqa: PLC0415

        outbox = await Outbox(settings.outbox, topic_prefix=settings.mqtt.topic_prefix).aopen()
        link = MqttLink(settings.mqtt, settings.node, agent_version=__version__)
        await link.start()
        drain = Drain(outbox, link)
        metrics_outbox.register(metrics.registry, outbox, link, drain)
        return cls(settings, outbox, link, drain)

    def attach(self, agent: Agent, sup: Supervisor) -> None:
        """Spawn the drain and telemetry; route desired state to model sync and state back."""
        from edge_agent import __version__  # noqa: PLC0415
        from edge_agent.transport.telemetry import TelemetryPublisher  # noqa: PLC0415

        s = self.settings
        pipeline = agent.pipeline
        assert pipeline is not None
        telemetry = TelemetryPublisher(
            self.link, s.node, s.mqtt.telemetry_interval_s,
            models=pipeline.telemetry_models,
            cameras=(pipeline.telemetry_cameras if agent.tracking is None else
                     tracking.camera_telemetry(pipeline.telemetry_cameras, agent.tracking)),
            outbox=self.outbox.snapshot, agent_version=__version__)
        sup.spawn("outbox-drain", self.drain.run(), drained=True)
        sup.spawn("telemetry", telemetry.run())
        if agent.tracking is not None and agent.tracking.board is not None:
            sup.spawn("zones", agent.tracking.board.run(), root=False)
        if agent.sync is not None:
            agent.sync.attach(self.link)  # desired state in, retained state out


def _decode_and_infer(slot: ModelSlot, data: bytes, max_pixels: int
                      ) -> tuple[ServingModel, InferOutput, tuple[int, int]]:
    image = images.decode(data, max_pixels)
    h, w = image.shape[:2]
    model, out = _infer_leased(slot, image)
    return model, out, (h, w)


def _infer_leased(slot: ModelSlot, image: np.ndarray) -> tuple[ServingModel, InferOutput]:
    model = slot.acquire()  # ModelError when nothing serves this name
    try:
        out = model.infer(image)
    except InputError:
        slot.release(model, None)  # the upload's fault, not the model's
        raise
    except Exception as exc:
        slot.release(model, False, f"{type(exc).__name__}: {exc}")
        raise ModelError(f"inference failed: {exc}") from exc
    slot.release(model, True)
    return model, out


async def run_agent(settings: AgentSettings, config_path: Path | None = None) -> int:
    """Run an agent until it is told to stop; return the process exit status."""
    return await Agent(settings, config_path=config_path).run()
