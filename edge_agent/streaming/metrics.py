"""Prometheus metrics of the agent: per-stage latency per model version, cameras, drops.

Observing must cost next to nothing on the per-frame path, so: histogram children per
(model, version) are looked up once and cached (``StageObservers``); everything a camera counts
anyway (frames, drops, reconnects, state, fps) is read at scrape time by a custom collector
instead of being mirrored into metric objects per frame; and each agent has its own
``CollectorRegistry`` (no global state: tests run several agents in one process).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge_agent.capture.camera import CAMERA_STATES, Camera
from edge_agent.streaming.slots import ServingModel

#: Seconds; dense between 1 ms and 250 ms where edge inference lives.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.004, 0.006, 0.008, 0.010, 0.015, 0.020, 0.030, 0.040, 0.050,
    0.075, 0.100, 0.150, 0.250, 0.500, 1.0, 2.5, 5.0,
)


@dataclass(frozen=True, slots=True)
class StageObservers:
    """The histogram children and counters of one model version (looked up once).

    The ``stage`` label's values are ``contract.results.STAGES``.
    """

    capture_to_start: Histogram
    preprocess: Histogram
    inference: Histogram
    postprocess: Histogram
    end_to_end: Histogram
    frames: Counter
    errors: Counter
    batch: Histogram


class _CameraCollector(Collector):
    def __init__(self, cameras: Callable[[], Iterable[Camera]]) -> None:
        self._cameras = cameras

    def collect(self) -> Iterator[Metric]:
        cams = list(self._cameras())
        lbl = ["camera"]
        fps = GaugeMetricFamily("edge_agent_camera_fps", "Frames read per second", labels=lbl)
        conn = GaugeMetricFamily("edge_agent_camera_connected",
                                 "1 when the camera delivers frames", labels=lbl)
        age = GaugeMetricFamily("edge_agent_camera_last_frame_age_seconds",
                                "Seconds since the newest frame (absent before the first)",
                                labels=lbl)
        state = GaugeMetricFamily("edge_agent_camera_state",
                                  "1 for the camera's current state", labels=["camera", "state"])
        read = CounterMetricFamily("edge_agent_camera_frames_read",
                                   "Frames grabbed from the source", labels=lbl)
        delivered = CounterMetricFamily("edge_agent_camera_frames_delivered",
                                        "Frames handed to inference", labels=lbl)
        dropped = CounterMetricFamily(
            "edge_agent_camera_frames_dropped",
            "Frames dropped: replaced by a newer frame before inference took them "
            "(overload) or without a loaded model", labels=lbl)
        skipped = CounterMetricFamily("edge_agent_camera_frames_skipped",
                                      "Frames skipped by the fps cap", labels=lbl)
        errors = CounterMetricFamily("edge_agent_camera_frame_errors",
                                     "Frames that failed to decode or preprocess", labels=lbl)
        reconnects = CounterMetricFamily("edge_agent_camera_reconnects",
                                         "Reconnect attempts after a failure", labels=lbl)
        stalls = CounterMetricFamily("edge_agent_camera_stalls",
                                     "Times the camera went silent while connected", labels=lbl)
        still = CounterMetricFamily(
            "edge_agent_camera_frames_still",
            "Frames motion gating kept from inference: nothing moved, keep-alive not due "
            "(absent for cameras without gating)", labels=lbl)
        keepalives = CounterMetricFamily(
            "edge_agent_camera_motion_keepalives",
            "Frames inferred without motion because the keep-alive was due", labels=lbl)
        for cam in cams:
            n = [cam.name]
            fps.add_metric(n, cam.current_fps())
            conn.add_metric(n, 1.0 if cam.state == "connected" else 0.0)
            a = cam.frame_age()
            if a is not None:
                age.add_metric(n, a)
            for st in CAMERA_STATES:
                state.add_metric([cam.name, st], 1.0 if cam.state == st else 0.0)
            read.add_metric(n, cam.frames_read)
            delivered.add_metric(n, cam.frames_delivered)
            dropped.add_metric(n, cam.dropped)
            skipped.add_metric(n, cam.frames_skipped)
            errors.add_metric(n, cam.errors)
            reconnects.add_metric(n, cam.reconnects)
            stalls.add_metric(n, cam.stalls)
            if cam.motion is not None:
                still.add_metric(n, cam.motion.still)
                keepalives.add_metric(n, cam.motion.keepalives)
        yield from (fps, conn, age, state, read, delivered, dropped, skipped, errors,
                    reconnects, stalls, still, keepalives)


class _CallbackCollector(Collector):
    def __init__(self, fn: Callable[[], Iterable[Metric]]) -> None:
        self._fn = fn

    def collect(self) -> Iterator[Metric]:
        yield from self._fn()


class AgentMetrics:
    """The agent's registry and the metric objects the pipeline observes."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        mv = ["model", "version"]
        self.stage = Histogram(
            "edge_agent_stage_seconds",
            "Per-frame latency by stage: capture_to_start (read to inference start, after "
            "preprocessing), preprocess, inference, postprocess, end_to_end (read to result "
            "handed to the sink)",
            [*mv, "stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.frames = Counter("edge_agent_frames", "Frames inferred (results produced)", mv,
                              registry=r)
        self.errors = Counter("edge_agent_inference_errors",
                              "Frames whose inference or post-processing failed", mv,
                              registry=r)
        self.batch = Histogram("edge_agent_batch_size", "Frames per session.run", mv,
                               buckets=(1, 2, 3, 4, 6, 8, 16, 32), registry=r)
        self.results_dropped = Counter(
            "edge_agent_results_dropped",
            "Results dropped before the sink (reason: backlog = the event loop fell behind)",
            ["reason"], registry=r)
        self.loop_lag = Histogram(
            "edge_agent_event_loop_lag_seconds", "How late the event loop woke up",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0), registry=r)
        self.workers = Gauge("edge_agent_inference_workers",
                             "Inference worker threads (chosen by measurement or config)",
                             registry=r)
        # the layout's choices and measurements (``streaming.calibration``, ``streaming.retune``)
        self.layout_max_batch = Gauge(
            "edge_agent_layout_max_batch", "Largest batch per model in the serving layout",
            ["model"], registry=r)
        self.layout_fps = Gauge(
            "edge_agent_layout_measured_fps",
            "Frames per second each candidate layout (w2b1 = 2 workers, batch 1) delivered in "
            "the latest measurement (start-up: synthetic; re-evaluation: the live pipeline)",
            ["layout"], registry=r)
        self.layout_chosen_fps = Gauge(
            "edge_agent_layout_chosen_fps",
            "Frames per second the serving layout delivered when it was chosen", registry=r)
        self.layout_chosen_at = Gauge(
            "edge_agent_layout_chosen_timestamp_seconds",
            "Unix time the serving layout was chosen", registry=r)
        self.layout_evaluations = Counter(
            "edge_agent_layout_evaluations",
            "Live re-evaluations of the layout by trigger (throughput_drop, backlog_idle_cpu, "
            "periodic) and outcome (changed, kept)", ["reason", "outcome"], registry=r)
        self.model_info = Gauge(
            "edge_agent_model_info", "1 per loaded model version",
            ["model", "version", "sha256", "task", "providers"], registry=r)
        self._children: dict[tuple[str, str], StageObservers] = {}
        self._lock = threading.Lock()

    def observers(self, model: str, version: str) -> StageObservers:
        """The cached metric children for one model version (cheap after the first call)."""
        key = (model, version)
        obs = self._children.get(key)
        if obs is None:
            with self._lock:
                obs = self._children.get(key)
                if obs is None:
                    h = self.stage
                    obs = StageObservers(
                        capture_to_start=h.labels(model, version, "capture_to_start"),
                        preprocess=h.labels(model, version, "preprocess"),
                        inference=h.labels(model, version, "inference"),
                        postprocess=h.labels(model, version, "postprocess"),
                        end_to_end=h.labels(model, version, "end_to_end"),
                        frames=self.frames.labels(model, version),
                        errors=self.errors.labels(model, version),
                        batch=self.batch.labels(model, version),
                    )
                    self._children[key] = obs
        return obs

    def watch_cameras(self, cameras: Callable[[], Iterable[Camera]]) -> None:
        """Expose the cameras' own counters and state at scrape time."""
        self.registry.register(_CameraCollector(cameras))

    def add_collector(self, fn: Callable[[], Iterable[Metric]]) -> None:
        """Expose metrics computed at scrape time by ``fn`` (e.g. the engine's counters)."""
        self.registry.register(_CallbackCollector(fn))

    def watch_provider_fallbacks(self) -> None:
        """Export the engine's process-wide execution provider fallback counts."""
        from edge_agent.inference.providers import fallback_counts  # noqa: PLC0415

        def collect() -> Iterator[Metric]:
            fam = CounterMetricFamily(
                "edge_agent_provider_fallbacks",
                "Model loads that fell back from an execution provider (reason: unavailable "
                "= not installed, init_failed = installed but failed to start)",
                labels=["provider", "reason"])
            for (provider, reason), n in sorted(fallback_counts().items()):
                fam.add_metric([provider, reason], n)
            yield fam

        self.add_collector(collect)

    def set_model_info(self, models: Iterable[ServingModel]) -> None:
        """Replace the model info series with the given loaded models."""
        self.model_info.clear()
        for m in models:
            self.model_info.labels(m.name, m.version, m.sha256, m.task,
                                   ",".join(m.providers)).set(1)
