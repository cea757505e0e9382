"""Motion gating on a clip that is still 80 % of the time: inference calls and CPU, gate off vs on.

The clip (``tests/agent/capture/motion_clip.py``) is a still street scene in which three
objects, in turn, move for a second and stop, plus a blinking sign the gate's mask covers. The
real agent (``edge_agent.app.compose.Agent``, the yolov8n-sized model, one worker, the file read
at ``rate: max`` so no frame is dropped and both runs see every frame) processes the whole clip
with motion gating off and on, interleaved, round after round. Figures:

- ``inference_cut``: 1 - results with the gate on / results with it off (each result is one
  inference);
- ``cpu_cut``: 1 - process CPU seconds on / off, from the agent's start to its last result;
- ``detect_delay_frames_max``: for every scripted motion start, the first inferred frame at or
  after it, minus the start (which frame a result came from is recorded where the camera hands
  frames to the scheduler);
- ``keepalive_ok``: the longest stretch without an inference is at most the keep-alive interval
  (in frames of the clip: the file's keep-alive clock is the video's own time).

Writes ``bench/out/motion.json``; the last line is ``inference_cut=... cpu_cut=...
detect_delay_frames_max=... keepalive_ok=...``. Targets (issue 16): inference_cut >= 0.70,
cpu_cut >= 0.50, detect_delay_frames_max <= 2.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.pipeline_variants import cpus, loadavg  # noqa: E402
from edge_agent.app.compose import Agent  # noqa: E402
from edge_agent.capture.camera import Camera  # noqa: E402
from edge_agent.config import load_settings  # noqa: E402
from edge_agent.streaming import scheduler as scheduling  # noqa: E402
from tests.agent.capture.motion_clip import SIGN_MASK, MotionClip, default_script, write_clip  # noqa: E402
from tests.support.broker import free_port  # noqa: E402

MANIFEST = ROOT / "models" / "out" / "yolov8n-like" / "manifest.json"
KEEPALIVE_S = 2.0


class FrameLog:
    """Which capture frame each result came from: ``Scheduler.offer`` wrapped for the run.

    The capture stamps each frame's ``ts`` (the result's ``ts``) once; the index is the frame's
    position in the file, so results map back onto the clip's script.
    """

    def __init__(self) -> None:
        self.index_by_ts: dict[float, int] = {}
        self._orig: Callable[..., None] = scheduling.Scheduler.offer

    def __enter__(self) -> FrameLog:
        orig, log = self._orig, self.index_by_ts

        def offer(sched: scheduling.Scheduler, frame: scheduling.StreamFrame,
                  camera: Camera) -> None:
            log[frame.ts] = frame.index
            orig(sched, frame, camera)

        scheduling.Scheduler.offer = offer  # type: ignore[method-assign,assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        scheduling.Scheduler.offer = self._orig  # type: ignore[method-assign]


class CountingSink:
    """Keeps each result's ``ts`` (in memory: the sink is not what is measured)."""

    def __init__(self) -> None:
        self.ts: list[float] = []

    def publish(self, result: dict[str, Any]) -> int:
        self.ts.append(result["ts"])
        return len(self.ts)

    async def aclose(self) -> None:
        return None


async def run_clip(clip: MotionClip, tmp: Path, *, gate: bool) -> dict[str, Any]:
    """The agent over the whole clip; results, CPU seconds, inferred frame indices."""
    motion = {"enabled": gate, "keepalive_s": KEEPALIVE_S, "masks": [SIGN_MASK]}
    s = load_settings(
        None, node="bench",
        models=[{"name": "yolov8n-like", "manifest": str(MANIFEST)}],
        cameras=[{"name": "cam0", "url": str(clip.path), "model": "yolov8n-like",
                  "rate": "max", "motion": motion}],
        pipeline={"workers": 1, "max_batch": 1, "sink": "jsonl"},
        http={"host": "127.0.0.1", "port": free_port()},
        hub={"cache_dir": str(tmp / "model-cache")},
        engine={"warmup_runs": 2},
        shutdown_timeout_s=10,
    )
    sink = CountingSink()
    agent = Agent(s, sink=sink)
    with FrameLog() as frames:
        await agent.start()
        cpu0, t0 = time.process_time(), time.perf_counter()
        try:
            assert agent.pipeline is not None
            cam = agent.pipeline.cameras["cam0"]
            deadline = time.monotonic() + 300
            while not (cam.state == "ended" and len(sink.ts) >= len(frames.index_by_ts)):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"clip not done: state {cam.state}, "
                                       f"{len(sink.ts)} results")
                await asyncio.sleep(0.01)
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
            still, keepalives = cam.frames_still, (cam.motion.keepalives if cam.motion else 0)
            telemetry = agent.pipeline.telemetry_cameras()[0].frames_still
        finally:
            await agent.stop()
        inferred = sorted(frames.index_by_ts[t] for t in sink.ts)
    return {"results": len(sink.ts), "cpu_s": round(cpu, 3), "wall_s": round(wall, 3),
            "frames_still": still, "keepalives": keepalives,
            "telemetry_frames_still": telemetry, "inferred": inferred}


def judge(clip: MotionClip, inferred: list[int]) -> dict[str, Any]:
    """Detection delay per scripted motion start, and the longest gap between inferences."""
    delays = {}
    for s in clip.starts:
        after = [i for i in inferred if i >= s]
        delays[s] = after[0] - s if after else None
    gap = max((b - a for a, b in itertools.pairwise(inferred)), default=clip.frames)
    limit = round(KEEPALIVE_S * clip.fps)
    missing = [s for s, d in delays.items() if d is None]
    return {"delays": delays, "delay_max": max((d for d in delays.values() if d is not None),
                                               default=None),
            "missed_starts": missing, "max_gap_frames": gap, "keepalive_frames": limit,
            "keepalive_ok": gap <= limit}


async def main_async(args: argparse.Namespace) -> int:
    frames = 450 if args.quick else 1800
    rounds = args.rounds or (2 if args.quick else 3)
    load = [loadavg()]
    with tempfile.TemporaryDirectory(prefix="bench-motion-") as d:
        tmp = Path(d)
        clip = write_clip(tmp / "clip.mp4", frames,
                          moves=default_script(frames, slot=150, moving=30))
        print(f"clip: {frames} frames at {clip.fps:g} fps, still {clip.still_fraction:.0%}, "
              f"motion starts at {clip.starts}")
        runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
        for r in range(rounds):
            for name in ("off", "on") if r % 2 == 0 else ("on", "off"):
                res = await run_clip(clip, tmp, gate=name == "on")
                runs[name].append(res)
                print(f"round {r + 1}/{rounds} gate {name}: {res['results']} inferences, "
                      f"cpu {res['cpu_s']:.2f} s, wall {res['wall_s']:.2f} s, "
                      f"still {res['frames_still']}, keep-alives {res['keepalives']}")
    load.append(loadavg())
    med = {k: {f: statistics.median(r[f] for r in v) for f in ("results", "cpu_s", "wall_s")}
           for k, v in runs.items()}
    verdicts = [judge(clip, r["inferred"]) for r in runs["on"]]
    delay_max = max((v["delay_max"] for v in verdicts if v["delay_max"] is not None), default=-1)
    figures = {
        "inference_cut": 1.0 - med["on"]["results"] / med["off"]["results"],
        "cpu_cut": 1.0 - med["on"]["cpu_s"] / med["off"]["cpu_s"],
        "detect_delay_frames_max": delay_max,
        "missed_starts": sum(len(v["missed_starts"]) for v in verdicts),
        "keepalive_ok": all(v["keepalive_ok"] for v in verdicts),
        "max_gap_frames": max(v["max_gap_frames"] for v in verdicts),
    }
    out = {
        "machine": {"cpus": cpus(), "loadavg_before": load[0], "loadavg_after": load[1]},
        "settings": {"quick": args.quick, "rounds": rounds, "frames": frames, "fps": clip.fps,
                     "still_fraction": clip.still_fraction, "starts": clip.starts,
                     "keepalive_s": KEEPALIVE_S, "model": str(MANIFEST.relative_to(ROOT))},
        "median": med,
        "runs": {k: [{f: x for f, x in r.items() if f != "inferred"} for r in v]
                 for k, v in runs.items()},
        "verdicts": [{**v, "delays": {str(k): x for k, x in v["delays"].items()}}
                     for v in verdicts],
        "figures": figures,
    }
    (ROOT / "bench" / "out").mkdir(exist_ok=True)
    (ROOT / "bench" / "out" / "motion.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"inference_cut={figures['inference_cut']:.3f} cpu_cut={figures['cpu_cut']:.3f} "
          f"detect_delay_frames_max={delay_max} keepalive_ok={figures['keepalive_ok']} "
          f"max_gap_frames={figures['max_gap_frames']} missed_starts={figures['missed_starts']}"
          f" loadavg={'/'.join(x.split()[0] for x in load)}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true",
                    help="a 15 s clip, 2 rounds (under a minute) instead of 60 s, 3 rounds")
    ap.add_argument("--rounds", type=int, default=0, help="rounds of off/on (default 2 or 3)")
    return asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
