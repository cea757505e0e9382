"""Benchmark: what a candidate in shadow costs the active model, measured in one run.

The real agent (``edge_agent.app.compose.Agent``: capture threads, scheduler, workers, relay)
serves the YOLOv8n-sized generated model (320x320) to cameras reading the 1280x720 H.264
sample video as fast as they can (``rate: max``, looping), so the workers keep every core busy.
A local file server stands in for the hub. Rounds alternate between the active model alone
and the active model with the *same* model as a candidate in shadow, named in a desired message
and loaded through model sync exactly as a rollout's shadow phase does (fetched, verified,
checked, handed to the shadow runner); the order flips every round so a busy neighbour on a
shared machine hits both alike. Per round: the active results per second reaching the sink,
the shadow's samples per second, and the shadow's busy seconds over the active's.

The budget (``model_sync.shadow_max_slowdown``, default 0.10) must keep the active throughput
at >= 1 - max_slowdown of the run without a shadow. Figures go to ``bench/out/shadow.json``;
the last line is ``active_fps_ratio_with_shadow=… active_per_cpu_s_ratio_with_shadow=…
shadow_busy_over_active=… shadow_samples_per_s=…`` (medians over the
rounds; the JSON has each round and the spread) with, beside them, the ratio of active results
per CPU second of the agent process (with/without: what the shadow costs, blind to neighbours
that take cores on a shared machine, where the fps ratio is mostly their noise) and the
shadow's busy seconds over the active's. ``--quick`` takes under a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402

from edge_agent.app.compose import Agent  # noqa: E402
from edge_agent.common.logs import configure_logging  # noqa: E402
from edge_agent.config import load_settings  # noqa: E402
from tests.support import fileserver  # noqa: E402

MODEL = "yolov8n-like"
MANIFEST = ROOT / "models" / "out" / MODEL / "manifest.json"
VIDEO = ROOT / "models" / "out" / "samples" / "synthetic-720p.mp4"
OUT = ROOT / "bench" / "out" / "shadow.json"

from pipeline_variants import cpus, fps_between, loadavg  # noqa: E402  (a sibling module)

Event = tuple[str, float, int]


class CountingSink:
    """Counts each result as it reaches the sink (and throws it away)."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.versions: set[str] = set()

    def publish(self, result: dict[str, Any]) -> int:
        self.events.append((result["camera"], time.perf_counter(), 1))
        self.versions.add(result["model"]["version"])
        return 0

    async def aclose(self) -> None:
        return None


class Hub:
    """The file server as the hub: the active version and a candidate (the same ONNX file
    under another version), and desired messages naming the candidate or not."""

    def __init__(self, server: fileserver.FileServer, node: str) -> None:
        self.server = server
        self.node = node
        self.generation = 0
        manifest = json.loads(MANIFEST.read_text())
        onnx = (MANIFEST.parent / manifest["file"]).read_bytes()
        self.sha = hashlib.sha256(onnx).hexdigest()
        self.version = manifest["version"]
        server.files["active.onnx"] = server.files["cand.onnx"] = onnx
        server.files["active.json"] = MANIFEST.read_bytes()
        server.files["cand.json"] = json.dumps({**manifest, "version": "2.0.0-shadow"}).encode()

    def artifact(self, key: str, version: str) -> dict[str, str]:
        return {"version": version, "sha256": self.sha, "url": self.server.url(f"{key}.onnx"),
                "manifest_url": self.server.url(f"{key}.json")}

    def desired(self, shadow: bool) -> bytes:
        self.generation += 1
        entry: dict[str, Any] = self.artifact("active", self.version)
        if shadow:
            entry["shadow"] = self.artifact("cand", "2.0.0-shadow")
        return orjson.dumps({"v": 1, "node": self.node, "generation": self.generation,
                             "models": {MODEL: entry}})


async def wait_for(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    rounds, secs, settle = (3, 3.0, 1.5) if args.quick else (args.rounds, args.secs, 3.0)
    workers = args.workers or cpus()
    cams = args.cameras or workers
    sink = CountingSink()
    async with fileserver.running() as server:
        hub = Hub(server, "bench")
        with tempfile.TemporaryDirectory() as tmp:
            s = load_settings(
                None, node="bench",
                models=[{"name": MODEL, "manifest": str(MANIFEST)}],
                cameras=[{"name": f"cam{i}", "url": str(VIDEO), "model": MODEL, "loop": True,
                          "rate": "max"} for i in range(cams)],
                pipeline={"workers": workers, "max_batch": 1, "sink": "jsonl"},
                http={"port": 0}, hub={"url": server.base, "cache_dir": str(Path(tmp) / "c")},
                engine={"warmup_runs": 2, "providers": ["cpu"]},
                model_sync={"shadow_max_slowdown": args.max_slowdown},
                shutdown_timeout_s=10,
            )
            agent = Agent(s, sink=sink)
            await agent.start()
            assert agent.sync is not None and agent.pipeline is not None
            rows: list[dict[str, Any]] = []
            try:
                await asyncio.sleep(settle)
                for rnd in range(rounds):
                    order = (False, True) if rnd % 2 == 0 else (True, False)
                    row: dict[str, Any] = {"round": rnd + 1}
                    for shadow in order:
                        agent.sync.on_desired("edge/bench/desired", hub.desired(shadow))
                        want = "2.0.0-shadow" if shadow else None
                        await wait_for(lambda w=want: agent.shadow.candidate(MODEL) == w,
                                       60, "the candidate to load/unload")
                        await asyncio.sleep(settle)
                        agent.shadow.take_window()
                        n0 = agent.shadow.counts.samples
                        t0, c0, f0 = time.perf_counter(), time.process_time(), len(sink.events)
                        await asyncio.sleep(secs)
                        t1, c1, f1 = time.perf_counter(), time.process_time(), len(sink.events)
                        win = agent.shadow.take_window().get((MODEL, hub.version))
                        tag = "with" if shadow else "without"
                        row[f"fps_{tag}"] = round(fps_between(sink.events, t0, t1), 2)
                        # results per CPU second of the whole agent process: what the shadow
                        # costs, blind to what neighbours on a shared machine take
                        row[f"per_cpu_s_{tag}"] = round((f1 - f0) / max(c1 - c0, 1e-9), 3)
                        if shadow:
                            row["shadow_samples_per_s"] = round(
                                (agent.shadow.counts.samples - n0) / (t1 - t0), 3)
                            if win is not None:
                                row["shadow_busy_over_active"] = round(
                                    win.busy_s / max(win.active_busy_s, 1e-9), 4)
                                row["agreement"] = round(
                                    win.agreement_sum / max(win.samples, 1), 4)
                                row["skipped"] = win.skipped
                    row["ratio"] = round(row["fps_with"] / row["fps_without"], 4)
                    row["cpu_ratio"] = round(row["per_cpu_s_with"] / row["per_cpu_s_without"], 4)
                    rows.append(row)
                    print(f"round {rnd + 1}: " + " ".join(f"{k}={v}" for k, v in row.items()
                                                          if k != "round"), flush=True)
            finally:
                await agent.stop()
    ratios = [r["ratio"] for r in rows]
    return {
        "machine": {"cpus": cpus(), "python": platform.python_version(),
                    "platform": platform.platform(), "loadavg_end": loadavg()},
        "model": MODEL, "video": VIDEO.name, "cameras": cams, "workers": workers,
        "max_slowdown": args.max_slowdown, "quick": args.quick, "rounds": rows,
        "fps_without_median": statistics.median(r["fps_without"] for r in rows),
        "fps_with_median": statistics.median(r["fps_with"] for r in rows),
        "ratio_of_medians": round(statistics.median(r["fps_with"] for r in rows)
                                  / statistics.median(r["fps_without"] for r in rows), 4),
        "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "cpu_ratio_median": statistics.median(r["cpu_ratio"] for r in rows),
        "cpu_ratio_min": min(r["cpu_ratio"] for r in rows),
        "cpu_ratio_max": max(r["cpu_ratio"] for r in rows),
        "shadow_samples_per_s_median": statistics.median(
            r.get("shadow_samples_per_s", 0.0) for r in rows),
        "shadow_busy_over_active_median": statistics.median(
            r.get("shadow_busy_over_active", 0.0) for r in rows),
        "published_versions": sorted(sink.versions),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 short rounds (under a minute)")
    ap.add_argument("--rounds", type=int, default=7, help="rounds of (without, with) (default 7)")
    ap.add_argument("--secs", type=float, default=8.0, help="seconds measured per run")
    ap.add_argument("--workers", type=int, default=0, help="inference workers (0: one per CPU)")
    ap.add_argument("--cameras", type=int, default=0, help="cameras (0: one per worker)")
    ap.add_argument("--max-slowdown", type=float, default=0.10,
                    help="model_sync.shadow_max_slowdown (default 0.10)")
    args = ap.parse_args()
    configure_logging("warning", json=False)
    t0 = time.perf_counter()
    res = asyncio.run(run(args))
    res["seconds"] = round(time.perf_counter() - t0, 1)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(res, indent=2))
    print(f"fps without={res['fps_without_median']:.1f} with={res['fps_with_median']:.1f} "
          f"(ratio per round: median {res['ratio_median']:.3f}, "
          f"min {res['ratio_min']:.3f}, max {res['ratio_max']:.3f}); results per CPU second "
          f"with/without: median {res['cpu_ratio_median']:.3f} (min "
          f"{res['cpu_ratio_min']:.3f}, max {res['cpu_ratio_max']:.3f}); "
          f"shadow busy / active busy {res['shadow_busy_over_active_median']:.3f}; "
          f"published versions {res['published_versions']}; {res['seconds']} s; wrote {OUT}")
    print(f"active_fps_ratio_with_shadow={res['ratio_median']:.3f} "
          f"active_per_cpu_s_ratio_with_shadow={res['cpu_ratio_median']:.3f} "
          f"shadow_busy_over_active={res['shadow_busy_over_active_median']:.3f} "
          f"shadow_samples_per_s={res['shadow_samples_per_s_median']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
