"""Speed of the real models' variants (models/variants.py) against the good model, in one run.

    .venv/bin/python bench/releases.py [--quick]

A bad release is dangerous because it is as fast as the good one: latency gates cannot see it.
This measures that claim. For each parent (``efficientnet-lite0``, ``centerface``) and each of
its variants, a bare ONNX Runtime session (CPU, one intra-op thread, all graph optimisations:
the agent's engine settings) runs the same frames (sample images, frames of ``bikes.mp4`` and
``carphone.mp4``), each preprocessed once beforehand by that model's own manifest, so only
``session.run`` is timed. Within a round every frame goes through every model in turn (the order
rotating), so a noisy neighbour hurts them alike; a variant's speed is the median over rounds of
its fps divided by the good model's fps in the same round, with the spread (min-max) beside it.

Writes ``bench/out/releases.json``. The last line is ``bgr_speed=... norm_speed=...
shuffled_speed=... reexport_speed=...`` (EfficientNet-Lite0 variants, ratios to the good model;
1.00 = as fast), then ``int8_speed`` and the CenterFace variants (``cf_*``) and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

from edge_agent.contract.manifest import load_manifest, model_path  # noqa: E402
from edge_agent.inference.preprocess import Preprocessor  # noqa: E402
from models import variants  # noqa: E402

OUT = ROOT / "models" / "out"
#: Short names of the variants in the last line, per parent.
PREFIX = {"efficientnet-lite0": "", "centerface": "cf_"}


def frames(every: int) -> list[np.ndarray]:
    """The sample images and every ``every``-th frame of the two sample clips (BGR)."""
    samples = OUT / "samples"
    out: list[np.ndarray] = []
    for name in variants.CALIBRATION_IMAGES:
        img = cv2.imread(str(samples / name), cv2.IMREAD_COLOR)
        if img is None:
            raise SystemExit(f"bench: error: {samples / name} missing: run models/build.py")
        out.append(img)
    for clip in ("bikes.mp4", "carphone.mp4"):
        cap = cv2.VideoCapture(str(samples / clip), cv2.CAP_FFMPEG)
        i = 0
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            if i % every == 0:
                out.append(frame)
            i += 1
        cap.release()
    if len(out) < 4:
        raise SystemExit("bench: error: sample clips missing: run models/build.py")
    return out


class Subject:
    """One model version: its session and the frames preprocessed per its own manifest."""

    def __init__(self, folder: str, images: list[np.ndarray]) -> None:
        manifest_path = OUT / folder / "manifest.json"
        if not manifest_path.is_file():
            raise SystemExit(f"bench: error: {manifest_path} missing: run models/build.py")
        m = load_manifest(manifest_path)
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        self.folder = folder
        self.session = ort.InferenceSession(str(model_path(manifest_path, m)), so,
                                            providers=["CPUExecutionProvider"])
        self.feed = m.input.name
        pre = Preprocessor(m.input)
        self.tensors = [pre(f)[0] for f in images]
        self.session.run(None, {self.feed: self.tensors[0]})  # warm-up

    def run(self, i: int) -> float:
        """Seconds ``session.run`` took on frame ``i``."""
        t0 = time.perf_counter()
        self.session.run(None, {self.feed: self.tensors[i]})
        return time.perf_counter() - t0


def measure(parent: str, names: list[str], images: list[np.ndarray],
            rounds: int) -> dict[str, Any]:
    """Interleaved rounds over the parent and its variants; fps and ratios per variant."""
    subjects = [Subject(n, images) for n in [parent, *names]]
    fps: dict[str, list[float]] = {s.folder: [] for s in subjects}
    count = len(images)
    for r in range(rounds):
        # frame by frame, every model in turn (the order rotating): a noisy neighbour's burst
        # falls on all of them alike
        busy = dict.fromkeys(fps, 0.0)
        for i in range(count):
            k = (r + i) % len(subjects)
            for s in subjects[k:] + subjects[:k]:
                busy[s.folder] += s.run(i)
        for name, seconds in busy.items():
            fps[name].append(count / seconds)
        print(f"{parent} round {r + 1}/{rounds}: " + " ".join(
            f"{k}={v[-1]:.1f}fps" for k, v in fps.items()), flush=True)
    result: dict[str, Any] = {"frames": len(images), "rounds": rounds, "fps_rounds": fps,
                              "fps_median": {k: float(np.median(v)) for k, v in fps.items()},
                              "ratio": {}}
    for n in names:
        per_round = [v / g for v, g in zip(fps[n], fps[parent], strict=True)]
        result["ratio"][n] = {"median": float(np.median(per_round)),
                              "min": float(min(per_round)), "max": float(max(per_round))}
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="about 40 s instead of a few minutes")
    args = ap.parse_args()
    # quick: 3 images + every 30th clip frame (16 frames), 5 rounds
    every, rounds = (30, 5) if args.quick else (5, 9)
    images = frames(every)
    children: dict[str, list[str]] = {}
    for name, parent, _ in variants.VARIANTS:
        children.setdefault(parent, []).append(name)
    t0 = time.perf_counter()
    results = {p: measure(p, names, images, rounds) for p, names in children.items()}
    loadavg = Path("/proc/loadavg")
    load = loadavg.read_text().split()[:3] if loadavg.exists() else []
    figures: dict[str, float] = {}
    for parent, res in results.items():
        for name, r in res["ratio"].items():
            key = f"{PREFIX[parent]}{name.removeprefix(parent + '-')}_speed"
            figures[key] = r["median"]
            print(f"{name}: {r['median']:.2f}x the good model's fps "
                  f"(rounds {r['min']:.2f}-{r['max']:.2f}; "
                  f"{res['fps_median'][name]:.1f} vs {res['fps_median'][parent]:.1f} fps)")
    out = {"quick": args.quick, "cores": os.cpu_count(), "loadavg": load,
           "seconds": time.perf_counter() - t0, "ort": ort.__version__, "models": results,
           "speed": figures}
    (ROOT / "bench" / "out").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "out" / "releases.json").write_text(json.dumps(out, indent=1) + "\n")
    print(" ".join(f"{k}={v:.2f}" for k, v in figures.items()) + f" loadavg={'/'.join(load)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
