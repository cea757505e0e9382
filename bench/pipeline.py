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

Then a **noisy start**: one camera, a first start (nothing stored) while one process per CPU
spins in bursts (50-400 ms on, 20-150 ms off: a neighbour's builds, pods starting together after
a power cut), the hogs killed as soon as the agent serves; the agent's fps over the following
``--noisy-seconds`` (60, 6 with ``--quick``) against the tuned pipeline measured right after. A
full run repeats it with ``pipeline.retune: false``.

Then, with one camera playing the video at its own frame rate, the latency the agent adds:
frame read -> result in the sink, minus the inference itself, at p50 and p99.

Figures go to ``bench/out/pipeline.json``; the last line is
``agent_over_tuned=… agent_over_naive=… agent_over_bare=… added_p50_ms=… added_p99_ms=…
agent_over_tuned_noisy_start=…`` (each of the first three ratios is the worst over the camera
counts). ``--quick`` takes under a minute on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_agent.common.logs import configure_logging  # noqa: E402
from edge_agent.config import EngineSettings  # noqa: E402
from edge_agent.inference.engine import LoadedModel  # noqa: E402

MANIFEST = ROOT / "models" / "out" / "yolov8n-like" / "manifest.json"
VIDEO = ROOT / "models" / "out" / "samples" / "synthetic-720p.mp4"
OUT = ROOT / "bench" / "out" / "pipeline.json"
CAMERA_COUNTS = (1, 2, 4)
MODES = ("bare", "tuned", "naive", "agent")

from pipeline_variants import (  # noqa: E402  (a sibling module of this script)
    Config,
    VideoLoop,
    candidates,
    cpus,
    loadavg,
    pct,
    run_agent,
    run_agent_noisy_start,
    run_bare,
    run_naive,
    run_tuned,
    session,
)


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
    #: Seconds the noisy-start agent is measured after the CPU hog left.
    noisy_s: float


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
        figures = {c.key: run_tuned(sessions, model.preprocess, c, cams, 0.3,
                                    (1 if plan.quick else 2) * plan.search_s)
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


#: Cameras of the noisy-start variant.
NOISY_CAMS = 1


def run_noisy(found: Search, sessions: dict[int, Any], model: LoadedModel, tmp: Path,
              plan: Plan, n_cpu: int) -> dict[str, Any]:
    """A first start under a CPU hog on every core (released once the agent serves): the
    agent's fps over the next ``plan.noisy_s`` against the tuned pipeline measured right after.
    A full run adds the same start with ``pipeline.retune: false``, what agents did before."""
    out: dict[str, Any] = {}
    for retune in [True] if plan.quick else [True, False]:
        res = asyncio.run(run_agent_noisy_start(
            NOISY_CAMS, tmp / f"noisy-{retune}" / "model-cache", secs=plan.noisy_s,
            calibrate_s=0.25 if plan.quick else 0.4, hogs=n_cpu, retune=retune))
        tuned = run_tuned(sessions, model.preprocess, found.tuned[NOISY_CAMS], NOISY_CAMS,
                          plan.warm, 1.5 if plan.quick else 10.0)
        ratio = res.fps / tuned if tuned > 0 else float("nan")
        out["retune" if retune else "no_retune"] = {
            "agent_fps": round(res.fps, 2), "tuned_fps": round(tuned, 2),
            "agent_over_tuned": round(ratio, 3), "startup_s": round(res.startup_s, 2),
            "started_with": {"workers": res.started[0], "batch": res.started[1]},
            "ended_with": {"workers": res.final[0], "batch": res.final[1]},
            "startup_calibration": res.calibration, "evaluations": res.evaluations}
        print(f"noisy start ({n_cpu} hogs, retune={'on' if retune else 'off'}): started "
              f"w{res.started[0]}b{res.started[1]} -> w{res.final[0]}b{res.final[1]}, agent="
              f"{res.fps:.1f} tuned={tuned:.1f} fps over {plan.noisy_s:.0f} s after the release "
              f"| agent/tuned={ratio:.3f} ({len(res.evaluations)} re-evaluations)", flush=True)
    return out


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
    ap.add_argument("--noisy-seconds", type=float, default=0.0,
                    help="seconds the agent started under a CPU hog is measured after the hog "
                    "leaves (default 60, 6 with --quick)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    quick = args.quick
    plan = Plan(quick=quick, rounds=args.rounds or (1 if quick else 3),
                secs=args.seconds or (1.3 if quick else 5.0), warm=0.4 if quick else 1.0,
                search_s=0.3 if quick else 1.0, passes=1 if quick else 2,
                lat_s=4.0 if quick else 20.0, noisy_s=args.noisy_seconds or (
                    6.0 if quick else 60.0))
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
        noisy = run_noisy(found, sessions, model, tmp, plan, n_cpu)
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
        "noisy_start": noisy,
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
          f"agent_over_bare={worst['bare']:.3f} added_p50_ms={p50:.2f} added_p99_ms={p99:.2f} "
          f"agent_over_tuned_noisy_start={noisy['retune']['agent_over_tuned']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
