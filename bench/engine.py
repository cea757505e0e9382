"""Engine thread settings: N concurrent calls with intra_op=1 vs one call with intra_op=N.

    .venv/bin/python bench/engine.py [--quick] [--model models/out/yolov8n-like/manifest.json]

Runs ``LoadedModel.run`` back to back on the YOLOv8n-sized model (one preprocessed frame, batch
1) for a fixed time in three configurations, interleaved over several rounds so a noisy
neighbour hurts them alike:

- ``intra1_x1``: one thread, ``intra_op_threads=1`` (a reference),
- ``intraN_x1``: one thread, ``intra_op_threads=N`` (the baseline: ORT's usual setup),
- ``intra1_xN``: N threads calling the same session concurrently, ``intra_op_threads=1``,

with N = the number of cores. Prints frames per second of each and the ratio of the concurrent
setup to the baseline; writes ``bench/out/engine.json``. The last line is
``concurrency_ratio=... intraN_fps=... intra1_xN_fps=... cores=... loadavg=...``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from edge_agent.config import EngineSettings  # noqa: E402
from edge_agent.inference.engine import LoadedModel  # noqa: E402

DEFAULT_MODEL = ROOT / "models" / "out" / "yolov8n-like" / "manifest.json"


def throughput(model: LoadedModel, x: np.ndarray, threads: int, seconds: float) -> float:
    """Frames per second of ``threads`` threads calling ``model.run(x)`` back to back."""
    stop = threading.Event()
    counts = [0] * threads
    start = threading.Barrier(threads + 1)

    def loop(i: int) -> None:
        model.run(x)  # per-thread warm-up, not counted
        start.wait()
        while not stop.is_set():
            model.run(x)
            counts[i] += 1

    pool = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in pool:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="about 20 s instead of about 90 s")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2,
                    help="N (default: the number of cores)")
    args = ap.parse_args()
    n = args.threads
    seconds, rounds = (2.0, 3) if args.quick else (5.0, 6)

    frame = cv2.imread(str(ROOT / "models" / "out" / "samples" / "astronaut.png"))
    configs = {"intra1_x1": (1, 1), f"intra{n}_x1": (n, 1), f"intra1_x{n}": (1, n)}
    models = {
        name: LoadedModel.load(
            args.model, EngineSettings(providers=["cpu"], intra_op_threads=intra)
        )
        for name, (intra, _) in configs.items()
    }
    x, _ = models["intra1_x1"].preprocess(frame)
    fps: dict[str, list[float]] = {name: [] for name in configs}
    for r in range(rounds):
        for name, (_, threads) in configs.items():
            fps[name].append(throughput(models[name], x, threads, seconds))
        print(f"round {r + 1}/{rounds}: " + " ".join(
            f"{k}={v[-1]:.1f}fps" for k, v in fps.items()), flush=True)
    med = {k: float(np.median(v)) for k, v in fps.items()}
    ratio = med[f"intra1_x{n}"] / med[f"intra{n}_x1"]
    loadavg = Path("/proc/loadavg")
    load = loadavg.read_text().split()[:3] if loadavg.exists() else []
    out = {
        "model": str(args.model), "cores": os.cpu_count(), "n": n, "seconds": seconds,
        "rounds": rounds, "fps_median": med, "fps_rounds": fps,
        "concurrency_ratio": ratio, "loadavg": load,
    }
    (ROOT / "bench" / "out").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "out" / "engine.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"concurrency_ratio={ratio:.2f} intra{n}_fps={med[f'intra{n}_x1']:.1f} "
          f"intra1_x{n}_fps={med[f'intra1_x{n}']:.1f} intra1_x1_fps={med['intra1_x1']:.1f} "
          f"cores={os.cpu_count()} loadavg={'/'.join(load)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
