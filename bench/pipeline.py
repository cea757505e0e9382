"""Benchmark: the agent's streaming pipeline against hand-written baselines, in one run.

On the YOLOv8n-sized generated model (320x320) and the 1280x720 H.264 sample video, for 1, 2
and 4 cameras, interleaved round by round so a busy neighbour on a shared machine hits every
variant alike:

- **bare**: ``session.run`` alone on frames already decoded and preprocessed, in the best of
  the sensible configurations (ORT intra-op threads x concurrent runs x batch size, searched
  first): the inference ceiling.
- **tuned**: a minimal hand-written pipeline, one thread decoding and preprocessing (round-robin
  over the cameras' videos) into a small queue that the best inference configuration drains
  (the best *with the decode thread beside it*: the top bare ones and one single-threaded run
  per CPU are tried); results thrown away. The ceiling for anything that must also decode.
- **naive**: one loop ``read -> preprocess -> run -> postprocess -> sink`` on a session with
  ORT's default threading (what one writes first).
- **agent**: the real ``edge_agent.app.compose.Agent`` (capture threads, scheduler, workers, relay,
  metrics, HTTP server, the JSON-lines sink) reading the video (``rate: max``, looping) into
  its sink; workers and batch size measured by the agent itself at its first start.

Then, with one camera playing the video at its own frame rate, the latency the agent adds:
frame read -> result in the sink, minus the inference itself, at p50 and p99.

Figures go to ``bench/out/pipeline.json``; the last line is
``agent_over_tuned=… agent_over_naive=… agent_over_bare=… added_p50_ms=… added_p99_ms=…``
(each ratio is the worst over the camera counts). ``--quick`` takes under a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import queue
import statistics
import sys
import tempfile
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
from edge_agent.common.logs import configure_logging  # noqa: E402
from edge_agent.config import EngineSettings, load_settings  # noqa: E402
from edge_agent.contract.manifest import load_manifest, model_path  # noqa: E402
from edge_agent.inference.engine import LoadedModel  # noqa: E402
from edge_agent.streaming.sinks import JsonLinesSink  # noqa: E402

MANIFEST = ROOT / "models" / "out" / "yolov8n-like" / "manifest.json"
VIDEO = ROOT / "models" / "out" / "samples" / "synthetic-720p.mp4"
OUT = ROOT / "bench" / "out" / "pipeline.json"
CAMERA_COUNTS = (1, 2, 4)
MODES = ("bare", "tuned", "naive", "agent")


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


async def run_agent(cams: int, tmp: Path, *, warm_s: float, secs: float, workers: int,
                    max_batch: int, calibrate_s: float, rate: str = "max",
                    latency: bool = False) -> AgentRun:
    cameras = [{"name": f"cam{i}", "url": str(VIDEO), "model": "yolov8n-like", "loop": True,
                "rate": rate} for i in range(cams)]
    from tests.support.broker import free_port  # noqa: PLC0415 - a free loopback port for HTTP

    s = load_settings(
        None, node="bench",
        models=[{"name": "yolov8n-like", "manifest": str(MANIFEST)}],
        cameras=cameras,
        pipeline={"workers": workers, "max_batch": max_batch, "calibrate_s": calibrate_s,
                  "sink": "jsonl"},
        http={"host": "127.0.0.1", "port": free_port()},
        hub={"cache_dir": str(tmp / "model-cache")},
        engine={"warmup_runs": 2},
        shutdown_timeout_s=10,
    )
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


# ---------------------------------------------------------------------------------- main


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    ys = sorted(xs)
    k = min(len(ys) - 1, max(0, round(q / 100.0 * (len(ys) - 1))))
    return ys[k]


@dataclass
class Plan:
    """How long each part of the run takes (``--quick`` or full)."""

    quick: bool
    rounds: int
    secs: float
    warm: float
    search_s: float
    passes: int
    lat_s: float


@dataclass
class Search:
    """The baselines' inference configurations, found on this machine in this run."""

    bare_fps: dict[str, float]
    best: dict[int, Config]
    tuned_fps: dict[str, dict[str, float]]
    tuned: dict[int, Config]


def search_configs(sessions: dict[int, ort.InferenceSession], tensors: list[np.ndarray],
                   model: LoadedModel, n_cpu: int, plan: Plan) -> Search:
    """The best bare ``session.run`` configuration per camera count, then the best tuned one."""
    # 1. best of the passes: a neighbour's burst on a shared machine rarely hits them all
    search: dict[str, float] = {}
    for _ in range(plan.passes):
        for cfg in candidates(n_cpu, max(CAMERA_COUNTS)):
            fps = run_bare(sessions, tensors, cfg, 0.2, plan.search_s)
            search[cfg.key] = max(search.get(cfg.key, 0.0), fps)
    best = {cams: max(candidates(n_cpu, cams), key=lambda c: search[c.key])
            for cams in CAMERA_COUNTS}
    print("# bare search (fps): " + " ".join(f"{k}={v:.1f}" for k, v in search.items()),
          flush=True)
    # 2. tuned keeps the configuration that is best *with decoding beside it*: the best bare
    # one may not be (e.g. two ORT threads in one run spin against the decode thread), and a
    # weak baseline would flatter the agent. Candidates: the three best bare ones and one
    # single-threaded run per CPU.
    tuned_search: dict[str, dict[str, float]] = {}
    tuned_cfg: dict[int, Config] = {}
    for cams in CAMERA_COUNTS:
        ranked = sorted(candidates(n_cpu, cams), key=lambda c: -search[c.key])[:3]
        default = Config(1, n_cpu, 1)
        tries = ranked + ([default] if default not in ranked else [])
        figures = {c.key: run_tuned(sessions, model.preprocess, c, cams, 0.3, 2 * plan.search_s)
                   for c in tries}
        tuned_search[str(cams)] = {k: round(v, 2) for k, v in figures.items()}
        tuned_cfg[cams] = max(tries, key=lambda c: figures[c.key])
    print("# tuned search (fps): " + " ".join(
        f"cameras={n}: " + ",".join(f"{k}={v:.1f}" for k, v in f.items())
        for n, f in tuned_search.items()), flush=True)
    return Search(search, best, tuned_search, tuned_cfg)


@dataclass
class Rounds:
    """Every cell's fps per round, and what the agent chose for itself."""

    cells: dict[int, dict[str, list[float]]]
    agent_cfg: dict[int, tuple[int, int]]
    agent_meta: dict[int, dict[str, Any]]


def run_cell(mode: str, cams: int, rounds: Rounds, found: Search, sessions: dict[int, Any],
             tensors: list[np.ndarray], models: tuple[LoadedModel, LoadedModel], tmp: Path,
             plan: Plan) -> float:
    """One measurement of one variant with ``cams`` cameras."""
    model, naive_model = models
    if mode == "bare":
        return run_bare(sessions, tensors, found.best[cams], plan.warm, plan.secs)
    if mode == "tuned":
        return run_tuned(sessions, model.preprocess, found.tuned[cams], cams, plan.warm,
                         plan.secs)
    if mode == "naive":
        return run_naive(naive_model, cams, plan.warm, plan.secs, tmp / "naive.jsonl")
    w, b = rounds.agent_cfg.get(cams, (0, 0))
    res = asyncio.run(run_agent(cams, tmp, warm_s=plan.warm + 0.6, secs=plan.secs, workers=w,
                                max_batch=b, calibrate_s=0.25 if plan.quick else 0.5))
    if cams not in rounds.agent_cfg:  # measured once, reused in later rounds
        rounds.agent_cfg[cams] = (res.workers, res.limits.get("yolov8n-like", 1))
        rounds.agent_meta[cams] = {"workers": res.workers, "batch_limits": res.limits,
                                   "calibration": res.calibration}
    return res.fps


def run_rounds(found: Search, sessions: dict[int, Any], tensors: list[np.ndarray],
               models: tuple[LoadedModel, LoadedModel], tmp: Path, plan: Plan) -> Rounds:
    """Every variant per camera count, interleaved, ``plan.rounds`` times."""
    rounds = Rounds({c: {m: [] for m in MODES} for c in CAMERA_COUNTS}, {}, {})
    for rnd in range(plan.rounds):
        for cams in CAMERA_COUNTS:
            # the order rotates each round, so a load change during a cell does not always
            # hit the same variant
            order = MODES[rnd % len(MODES):] + MODES[: rnd % len(MODES)]
            for mode in order:
                fps = run_cell(mode, cams, rounds, found, sessions, tensors, models, tmp, plan)
                rounds.cells[cams][mode].append(fps)
            row = " ".join(f"{m}={rounds.cells[cams][m][-1]:.1f}" for m in MODES)
            print(f"round {rnd + 1} cameras={cams}: {row} (fps)", flush=True)
    return rounds


def summarize(rounds: Rounds, found: Search) -> tuple[dict[str, Any], dict[str, float]]:
    """Medians per camera count and the per-round paired ratios; the worst ratio per base."""
    summary: dict[str, Any] = {}
    worst = {"tuned": float("inf"), "naive": float("inf"), "bare": float("inf")}
    for cams in CAMERA_COUNTS:
        c = rounds.cells[cams]
        med = {m: statistics.median(c[m]) for m in MODES}
        # per-round ratios (the two runs closest in time), median over rounds
        ratios = {base: statistics.median(a / x for a, x in zip(c["agent"], c[base],
                                                                strict=True))
                  for base in ("tuned", "naive", "bare")}
        for base, r in ratios.items():
            worst[base] = min(worst[base], r)
        summary[str(cams)] = {"fps_median": {m: round(v, 2) for m, v in med.items()},
                              "fps_rounds": {m: [round(x, 2) for x in c[m]] for m in MODES},
                              "agent_over": {k: round(v, 3) for k, v in ratios.items()},
                              "inference_config": {"bare": found.best[cams].key,
                                                   "tuned": found.tuned[cams].key},
                              "agent": rounds.agent_meta.get(cams, {})}
        print(f"cameras={cams}: " + " ".join(f"{m}={med[m]:.1f}" for m in MODES)
              + f" fps | agent/tuned={ratios['tuned']:.3f} agent/naive={ratios['naive']:.3f}"
              f" agent/bare={ratios['bare']:.3f}", flush=True)
    return summary, worst


def parse_plan(argv: list[str] | None) -> tuple[Plan, Path]:
    """Command line → durations and the output file."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one short round (under a minute)")
    ap.add_argument("--rounds", type=int, default=0, help="interleaved rounds (default 3, "
                    "1 with --quick)")
    ap.add_argument("--seconds", type=float, default=0.0, help="measured seconds per cell")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    quick = args.quick
    plan = Plan(quick=quick, rounds=args.rounds or (1 if quick else 3),
                secs=args.seconds or (1.3 if quick else 5.0), warm=0.4 if quick else 1.0,
                search_s=0.3 if quick else 1.0, passes=1 if quick else 2,
                lat_s=4.0 if quick else 20.0)
    return plan, args.out


def main(argv: list[str] | None = None) -> int:
    plan, out = parse_plan(argv)
    for p in (MANIFEST, VIDEO):
        if not p.exists():
            print(f"missing {p}: run `python models/build.py` first", file=sys.stderr)
            return 2
    n_cpu = cpus()
    configure_logging("error", json=True)
    cv2.setNumThreads(1)  # the agent's choice too: threads belong to cameras and workers
    t_start = time.perf_counter()
    load_before = loadavg()
    print(f"# pipeline bench: {n_cpu} CPUs, onnxruntime {ort.__version__}, opencv "
          f"{cv2.__version__}, loadavg {load_before}", flush=True)

    # frames decoded and preprocessed once, for bare
    model = LoadedModel.load(MANIFEST, EngineSettings(intra_op_threads=1, warmup_runs=1))
    naive_model = LoadedModel.load(MANIFEST, EngineSettings(intra_op_threads=n_cpu,
                                                            warmup_runs=1))
    v = VideoLoop(VIDEO)
    tensors = [model.preprocess(v.read())[0] for _ in range(16)]
    v.close()
    sessions = {i: session(i) for i in sorted({1, n_cpu, 2} & set(range(1, n_cpu + 1)))}
    found = search_configs(sessions, tensors, model, n_cpu, plan)
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmpdir:
        tmp = Path(tmpdir)
        rounds = run_rounds(found, sessions, tensors, (model, naive_model), tmp, plan)
        # the latency the agent adds, one camera at the video's own frame rate
        w, b = rounds.agent_cfg[1]
        lat = asyncio.run(run_agent(1, tmp, warm_s=1.0, secs=plan.lat_s, workers=w,
                                    max_batch=b, calibrate_s=0.25, rate="native",
                                    latency=True))
    model.close()
    naive_model.close()

    summary, worst = summarize(rounds, found)
    added = lat.added_ms
    p50, p99 = pct(added, 50), pct(added, 99)
    result = {
        "machine": {"cpus": n_cpu, "platform": platform.platform(),
                    "onnxruntime": ort.__version__, "opencv": cv2.__version__,
                    "loadavg_before": load_before, "loadavg_after": loadavg()},
        "settings": {"quick": plan.quick, "rounds": plan.rounds,
                     "seconds_per_cell": plan.secs, "model": str(MANIFEST.relative_to(ROOT)),
                     "video": str(VIDEO.relative_to(ROOT))},
        "bare_search_fps": {k: round(v, 2) for k, v in found.bare_fps.items()},
        "tuned_search_fps": found.tuned_fps,
        "cameras": summary,
        "latency_one_camera_native_rate": {
            "results": len(added), "agent_fps": round(lat.fps, 2),
            "added_ms": {"p50": round(p50, 3), "p90": round(pct(added, 90), 3),
                         "p99": round(p99, 3), "max": round(max(added, default=0.0), 3)},
            "stage_ms_p50": {k: round(pct(v, 50), 3) for k, v in lat.stages.items()},
            "stage_ms_p99": {k: round(pct(v, 99), 3) for k, v in lat.stages.items()}},
        "worst": {f"agent_over_{k}": round(v, 3) for k, v in worst.items()},
        "took_s": round(time.perf_counter() - t_start, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    st = result["latency_one_camera_native_rate"]["stage_ms_p50"]  # type: ignore[index]
    print("# stage p50 (ms): " + " ".join(f"{k}={v}" for k, v in st.items()), flush=True)
    print(f"# added latency, 1 camera at {lat.fps:.1f} fps: p50={p50:.2f} ms p99={p99:.2f} ms "
          f"({len(added)} results); loadavg now {loadavg()}; took "
          f"{result['took_s']} s; figures in {out}", flush=True)
    print(f"agent_over_tuned={worst['tuned']:.3f} agent_over_naive={worst['naive']:.3f} "
          f"agent_over_bare={worst['bare']:.3f} added_p50_ms={p50:.2f} added_p99_ms={p99:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
