"""The variants ``bench/pipeline.py`` measures side by side, and how it measures them.

``bare`` (``session.run`` on pre-decoded tensors), ``tuned`` (one decode thread feeding the best
inference layout found here), ``naive`` (read, infer, post-process, write, one frame at a time)
and ``agent`` (the real agent with its own sink); each returns frames per second between a
warm-up and the end of its measured window.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_agent.app.compose import Agent  # noqa: E402
from edge_agent.config import load_settings  # noqa: E402
from edge_agent.contract.manifest import load_manifest, model_path  # noqa: E402
from edge_agent.inference.engine import LoadedModel  # noqa: E402
from edge_agent.streaming.sinks import JsonLinesSink  # noqa: E402

MANIFEST = ROOT / "models" / "out" / "yolov8n-like" / "manifest.json"
VIDEO = ROOT / "models" / "out" / "samples" / "synthetic-720p.mp4"


def cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "n/a"


# ------------------------------------------------------------------------------- helpers


class VideoLoop:
    """A video file read forever (reopened at its end), like a looping camera."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)

    def read(self) -> np.ndarray:
        ok, frame = self.cap.read()
        if not ok:
            self.cap.release()
            self.cap = cv2.VideoCapture(str(self.path), cv2.CAP_FFMPEG)
            ok, frame = self.cap.read()
            assert ok, f"cannot read {self.path}"
        return frame

    def close(self) -> None:
        self.cap.release()


def session(intra: int) -> ort.InferenceSession:
    """A plain CPU session on the benchmark model with ``intra`` intra-op threads."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = intra
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    path = model_path(MANIFEST, load_manifest(MANIFEST))
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


#: A completion: (stream, perf_counter, frames). A stream is one sequential producer of
#: completions: an inference thread (bare, tuned), the naive loop, or one camera (agent).
Event = tuple[str, float, int]


def fps_between(events: list[Event], start: float, end: float) -> float:
    """Frames per second from the completions in [start, end], summed over streams.

    Each stream is timed from its first completion in the window to its last (the first one's
    frames excluded), so the window's edges never cut an inference in two, and concurrent
    streams in or out of phase do not bias the figure.
    """
    by: dict[str, list[tuple[float, int]]] = {}
    for stream, t, n in events:
        if start <= t <= end:
            by.setdefault(stream, []).append((t, n))
    total = 0.0
    for ev in by.values():
        ev.sort()
        if len(ev) >= 2 and ev[-1][0] > ev[0][0]:
            total += sum(n for _, n in ev[1:]) / (ev[-1][0] - ev[0][0])
    return total


def _enough(events: list[Event], start: float, per_stream: int = 4) -> bool:
    counts: dict[str, int] = {}
    for stream, t, _ in events:
        if t >= start:
            counts[stream] = counts.get(stream, 0) + 1
    return bool(counts) and min(counts.values()) >= per_stream


def measure(events: list[Event], warm_s: float, secs: float) -> float:
    """Frames per second of a running workload over ``secs`` after ``warm_s``.

    The window grows (up to 3x) until every stream has a few completions in it, so a slow
    configuration on a busy machine still gets a figure.
    """
    t0 = time.perf_counter() + warm_s
    time.sleep(warm_s + secs)
    end = t0 + secs
    while not _enough(events, t0) and end < t0 + 3 * secs:
        time.sleep(secs / 4)
        end = time.perf_counter()
    return fps_between(events, t0, end)


@dataclass(frozen=True)
class Config:
    """An inference configuration: ORT intra-op threads, concurrent runs, batch size."""

    intra: int
    conc: int
    batch: int

    @property
    def key(self) -> str:
        return f"intra{self.intra}-conc{self.conc}-batch{self.batch}"


def candidates(n_cpu: int, max_batch: int) -> list[Config]:
    """The sensible configurations: all threads in one run, one thread per concurrent run."""
    shapes = {(1, 1), (n_cpu, 1), (1, n_cpu)}
    if n_cpu >= 4:
        shapes.add((2, n_cpu // 2))
    return [Config(i, c, b) for (i, c) in sorted(shapes) for b in (1, 2, 4) if b <= max_batch]


# --------------------------------------------------------------------------------- modes


class Runner:
    """Threads that run until ``stop``; ``done(n)`` records n frames completed now."""

    def __init__(self) -> None:
        self.stop_ev = threading.Event()
        self.events: list[Event] = []
        self.threads: list[threading.Thread] = []

    def done(self, n: int) -> None:
        """Record ``n`` frames completed now by the calling thread (list.append is atomic)."""
        self.events.append((threading.current_thread().name, time.perf_counter(), n))

    def spawn(self, fn: Callable[[], None]) -> None:
        t = threading.Thread(target=fn, daemon=True)
        self.threads.append(t)
        t.start()

    def stop(self) -> None:
        self.stop_ev.set()
        for t in self.threads:
            t.join()


def run_bare(sessions: dict[int, ort.InferenceSession], tensors: list[np.ndarray], cfg: Config,
             warm_s: float, secs: float) -> float:
    sess = sessions[cfg.intra]
    name = sess.get_inputs()[0].name
    batches = [np.concatenate(tensors[i : i + cfg.batch])
               for i in range(0, len(tensors) - cfg.batch + 1, cfg.batch)]
    r = Runner()

    def loop() -> None:
        for x in itertools.cycle(batches):
            if r.stop_ev.is_set():
                return
            sess.run(None, {name: x})
            r.done(cfg.batch)

    for _ in range(cfg.conc):
        r.spawn(loop)
    try:
        return measure(r.events, warm_s, secs)
    finally:
        r.stop()


class _TunedFeed:
    """The tuned pipeline's two sides: one decode thread batching frames, infer threads."""

    def __init__(self, r: Runner, sess: ort.InferenceSession, pre: Callable[[np.ndarray], Any],
                 cfg: Config, videos: list[VideoLoop]) -> None:
        self.r, self.sess, self.pre, self.cfg, self.videos = r, sess, pre, cfg, videos
        self.name = sess.get_inputs()[0].name
        self.q: queue.Queue[np.ndarray | None] = queue.Queue(maxsize=2 * cfg.conc)

    def _put(self, batch: np.ndarray) -> None:
        while not self.r.stop_ev.is_set():
            with contextlib.suppress(queue.Full):
                self.q.put(batch, timeout=0.1)
                return

    def decode(self) -> None:
        pending: list[np.ndarray] = []
        for v in itertools.cycle(self.videos):
            if self.r.stop_ev.is_set():
                break
            x, _ = self.pre(v.read())
            pending.append(x)
            if len(pending) == self.cfg.batch:
                self._put(pending[0] if self.cfg.batch == 1 else np.concatenate(pending))
                pending = []
        for _ in range(self.cfg.conc):
            with contextlib.suppress(queue.Full):
                self.q.put_nowait(None)

    def infer(self) -> None:
        while not self.r.stop_ev.is_set():
            try:
                x = self.q.get(timeout=0.1)
            except queue.Empty:
                continue
            if x is None:
                return
            self.sess.run(None, {self.name: x})
            self.r.done(x.shape[0])


def run_tuned(sessions: dict[int, ort.InferenceSession], pre: Callable[[np.ndarray], Any],
              cfg: Config, cams: int, warm_s: float, secs: float) -> float:
    """One decode+preprocess thread (round-robin over the cameras) feeding ``cfg``."""
    r = Runner()
    videos = [VideoLoop(VIDEO) for _ in range(cams)]
    feed = _TunedFeed(r, sessions[cfg.intra], pre, cfg, videos)
    r.spawn(feed.decode)
    for _ in range(cfg.conc):
        r.spawn(feed.infer)
    try:
        return measure(r.events, warm_s, secs)
    finally:
        r.stop()
        for v in videos:
            v.close()


def run_naive(model: LoadedModel, cams: int, warm_s: float, secs: float, out: Path) -> float:
    """read -> preprocess -> run -> postprocess -> sink, one frame at a time, in one loop."""
    sink = JsonLinesSink(out, append=False).open_sync()
    videos = [VideoLoop(VIDEO) for _ in range(cams)]
    r = Runner()

    def loop() -> None:
        for c, v in itertools.cycle(list(enumerate(videos))):
            if r.stop_ev.is_set():
                return
            frame = v.read()
            ts = time.time()
            x, meta = model.preprocess(frame)
            out_ = model.postprocess(model.run(x), [meta])[0]
            sink.publish({"v": 1, "node": "bench", "camera": f"cam{c}", "ts": ts,
                          "model": {"name": model.name, "version": model.version},
                          "task": model.task, "frame": {"width": frame.shape[1],
                                                        "height": frame.shape[0]},
                          "latency_ms": {}, **out_})
            r.done(1)

    r.spawn(loop)
    try:
        return measure(r.events, warm_s, secs)
    finally:
        r.stop()
        sink.close_sync()
        for v in videos:
            v.close()


class BenchSink:
    """The agent's JSON-lines sink, plus a count and, when asked, the added latency."""

    def __init__(self, inner: JsonLinesSink) -> None:
        self.inner = inner
        self.events: list[Event] = []
        self.record = False
        self.added_ms: list[float] = []
        self.stages: dict[str, list[float]] = {}

    def publish(self, result: dict[str, Any]) -> int:
        if self.record:
            # frame read (ts, stamped by the capture thread) -> here, minus the inference
            lat = result["latency_ms"]
            self.added_ms.append((time.time() - result["ts"]) * 1000.0 - lat["inference"])
            for k, v in lat.items():
                self.stages.setdefault(k, []).append(v)
        self.events.append((result["camera"], time.perf_counter(), 1))
        return self.inner.publish(result)

    async def aclose(self) -> None:
        await self.inner.aclose()


@dataclass
class AgentRun:
    fps: float = 0.0
    workers: int = 0
    limits: dict[str, int] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    added_ms: list[float] = field(default_factory=list)
    stages: dict[str, list[float]] = field(default_factory=dict)


def _agent_settings(cams: int, cache: Path, *, workers: int, max_batch: int,
                    calibrate_s: float, rate: str = "max", **pipeline: Any) -> Any:
    cameras = [{"name": f"cam{i}", "url": str(VIDEO), "model": "yolov8n-like", "loop": True,
                "rate": rate} for i in range(cams)]
    from tests.support.broker import free_port  # noqa: PLC0415 - a free loopback port for HTTP

    return load_settings(
        None, node="bench",
        models=[{"name": "yolov8n-like", "manifest": str(MANIFEST)}],
        cameras=cameras,
        pipeline={"workers": workers, "max_batch": max_batch, "calibrate_s": calibrate_s,
                  "sink": "jsonl", **pipeline},
        http={"host": "127.0.0.1", "port": free_port()},
        hub={"cache_dir": str(cache)},
        engine={"warmup_runs": 2},
        shutdown_timeout_s=10,
    )


async def run_agent(cams: int, tmp: Path, *, warm_s: float, secs: float, workers: int,
                    max_batch: int, calibrate_s: float, rate: str = "max",
                    latency: bool = False) -> AgentRun:
    s = _agent_settings(cams, tmp / "model-cache", workers=workers, max_batch=max_batch,
                        calibrate_s=calibrate_s, rate=rate)
    inner = await JsonLinesSink(tmp / f"agent-{cams}.jsonl", append=False).open()
    sink = BenchSink(inner)
    agent = Agent(s, sink=sink)
    await agent.start()
    try:
        await asyncio.sleep(warm_s)
        sink.record = latency
        t0 = time.perf_counter()
        await asyncio.sleep(secs)
        end = t0 + secs
        while not _enough(sink.events, t0) and end < t0 + 3 * secs:
            await asyncio.sleep(secs / 4)
            end = time.perf_counter()
        fps = fps_between(sink.events, t0, end)
        sink.record = False
        assert agent.pipeline is not None
        res = AgentRun(fps, agent.pipeline.scheduler.workers,
                       dict(agent.pipeline.scheduler.batch_limits), dict(agent.calibration),
                       list(sink.added_ms), dict(sink.stages))
    finally:
        await agent.stop()
        await inner.aclose()
    return res


# ------------------------------------------------------------------ a CPU hog at start-up


#: One hog process: spins in bursts of 50-400 ms with pauses of 20-150 ms (a neighbour's builds
#: and pods starting after a power cut are bursty, which is what fools a one-shot measurement).
HOG = """
import random, time
rng = random.Random()
while True:
    end = time.perf_counter() + rng.uniform(0.05, 0.4)
    while time.perf_counter() < end:
        pass
    time.sleep(rng.uniform(0.02, 0.15))
"""


class CpuHog:
    """``n`` processes spinning on the cores (in bursts) until ``release``."""

    def __init__(self, n: int) -> None:
        self.procs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(n)]

    def release(self) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait(10)


@dataclass
class NoisyStart:
    """The agent started under a CPU hog: its fps after the hog left, and its layouts."""

    fps: float
    started: tuple[int, int]
    final: tuple[int, int]
    calibration: dict[str, Any]
    evaluations: list[dict[str, Any]]
    startup_s: float


async def run_agent_noisy_start(cams: int, cache: Path, *, secs: float, calibrate_s: float,
                                hogs: int, retune: bool = True) -> NoisyStart:
    """A first start (nothing stored) with ``hogs`` spinning processes, released once the agent
    serves; frames per second over the ``secs`` that follow the release."""
    s = _agent_settings(cams, cache, workers=0, max_batch=0, calibrate_s=calibrate_s,
                        retune=retune)
    inner = await JsonLinesSink(cache.parent / f"noisy-{cams}.jsonl", append=False).open()
    sink = BenchSink(inner)
    hog = CpuHog(hogs)
    await asyncio.sleep(0.3)  # the hogs run before the agent measures
    t0 = time.perf_counter()
    agent = Agent(s, sink=sink)
    try:
        await agent.start()
        startup_s = time.perf_counter() - t0
        assert agent.pipeline is not None
        sched = agent.pipeline.scheduler
        started = (sched.workers, sched.batch_limits.get("yolov8n-like", 1))
    finally:
        await asyncio.to_thread(hog.release)
    try:
        t1, t1_wall = time.perf_counter(), time.time()
        await asyncio.sleep(secs)
        fps = fps_between(sink.events, t1, t1 + secs)
        final = (sched.workers, sched.batch_limits.get("yolov8n-like", 1))
        history = [] if agent.retuner is None else [
            {"reason": c.reason, "workers": c.workers, "batch": c.batch, "changed": c.changed,
             "fps": c.figures, "rounds": c.rounds, "settled": c.settled,
             "after_release_s": round(c.at - t1_wall, 2)}
            for c in agent.retuner.history[1:]]
    finally:
        await agent.stop()
        await inner.aclose()
    return NoisyStart(fps, started, final, dict(agent.calibration), history, startup_s)


# ---------------------------------------------------------------------------------- main


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    ys = sorted(xs)
    k = min(len(ys) - 1, max(0, round(q / 100.0 * (len(ys) - 1))))
    return ys[k]
