"""INT8 vs fp32 in one run: speed of EfficientNet-Lite0 and the YOLOv8n-sized model, and
EfficientNet-Lite0's top-1 agreement on held-out real frames.

    .venv/bin/python bench/int8.py [--quick]

Both models are quantised here by ``edge-hub models quantize``'s quantiser
(``edge_agent.commands.quantize``: static QDQ, per-channel weights, MinMax ranges, calibration
frames preprocessed by the agent's ``Preprocessor``) on frames of the samples (the three images,
``bikes.mp4``, ``carphone.mp4``: 373 frames); the calibration frames (64) are spread evenly over
them and every other frame is held out (309). EfficientNet-Lite0 goes through the verb's
automatic choice of leading fp32 nodes (``quantize.Auto``, measured on the calibration frames
only); the YOLOv8n-sized model is all INT8 (its weights are random, so no agreement can choose
for it). On the held-out frames: EfficientNet-Lite0's top-1
agreement with fp32 (``streaming.shadow.agreement``), also over the frames where fp32's own
top-1 probability is >= 0.3 and per source; the YOLOv8n-sized model's box F1 (its weights are
random, so only the speed means much). Speed: ``session.run`` fps of fp32 and INT8 through the
agent's engine (CPU, one intra-op thread, batch 1), interleaved rounds, the median of the
per-round ratios.

Without ``--quick`` it also sweeps the settings on EfficientNet-Lite0 (``SWEEP``: per-channel vs
per-tensor weights; MinMax, Entropy, 99.99/99.999-percentile ranges; uint8 vs int8 activations;
reduce_range; 0 to 9 leading nodes in fp32; 8 to 128 calibration frames), which is how the
verb's defaults were chosen (docs/registry.md). ``--quick`` (< 60 s) skips the automatic choice
and the sweep: EfficientNet-Lite0 keeps the 6 leading nodes the full run chooses, on 32
calibration frames (held out: 341). Writes ``bench/out/int8.json``; the last line is
``int8_speedup_yolo=... int8_speedup_effnet=... int8_top1_agreement_effnet=...
int8_top1_agreement_effnet_confident=... int8_fp32_first_effnet=...``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from edge_agent.commands import quantize as q  # noqa: E402

OUT = ROOT / "models" / "out"
SAMPLES = ("astronaut.png", "chelsea.png", "coffee.png", "bikes.mp4", "carphone.mp4")
#: (label, ``quantize.Settings`` fields, calibration frames) measured on EfficientNet-Lite0.
SWEEP: list[tuple[str, dict[str, Any], int]] = [
    ("minmax", {}, 32),
    ("minmax per-tensor", {"per_channel": False}, 32),
    ("entropy", {"calibration": "entropy"}, 32),
    ("percentile 99.99", {"calibration": "percentile", "percentile": 99.99}, 32),
    ("percentile 99.999", {"calibration": "percentile"}, 32),
    ("minmax int8 symmetric activations", {"activations": "QInt8"}, 32),
    ("minmax reduce_range", {"reduce_range": True}, 32),
    ("minmax, stem conv and Gemm fp32", {"fp32_first": 1, "fp32_op_types": ("Gemm",)}, 32),
    ("minmax, first 3 fp32", {"fp32_first": 3}, 32),
    ("minmax, first 6 fp32", {"fp32_first": 6}, 32),
    ("minmax, first 9 fp32", {"fp32_first": 9}, 32),
    ("entropy, first 6 fp32", {"fp32_first": 6, "calibration": "entropy"}, 32),
    ("percentile 99.99, first 6 fp32",
     {"fp32_first": 6, "calibration": "percentile", "percentile": 99.99}, 32),
    ("percentile 99.999, first 6 fp32", {"fp32_first": 6, "calibration": "percentile"}, 32),
    ("minmax, first 6 fp32", {"fp32_first": 6}, 8),
    ("minmax, first 6 fp32", {"fp32_first": 6}, 64),
    ("minmax, first 6 fp32", {"fp32_first": 6}, 128),
]


def _frames() -> tuple[list[np.ndarray], list[str]]:
    """All sample frames (BGR) and the source of each."""
    frames: list[np.ndarray] = []
    names: list[str] = []
    for name in SAMPLES:
        path = OUT / "samples" / name
        if not path.exists():
            raise SystemExit(f"bench: error: {path} missing: run models/build.py")
        got = q.read_frames([path], limit=10_000)
        frames += got
        names += [name if name.endswith(".mp4") else "images"] * len(got)
    return frames, names


def _split(frames: list[np.ndarray], names: list[str], n: int) -> tuple[
        list[np.ndarray], list[np.ndarray], list[str]]:
    idx = list(range(len(frames)))
    calib_i, held_i = q.split(idx, n)
    return [frames[i] for i in calib_i], [frames[i] for i in held_i], [names[i] for i in held_i]


def _one(model: str, work: Path, settings: q.Settings, calib: list[np.ndarray],
         held: list[np.ndarray], rounds: int, seconds: float, tag: str = "",
         auto: q.Auto | None = None) -> dict[str, Any]:
    report = q.run(OUT / model, work / (tag or model), version="bench-int8",
                   calibration=calib, heldout=held, settings=settings,
                   sources=("samples", "samples (other frames)"), rounds=rounds,
                   seconds=seconds, auto=auto)
    data: dict[str, Any] = report.model_dump(mode="json")
    return data


def _per_source(work: Path, tag: str, held: list[np.ndarray],
                names: list[str]) -> dict[str, float]:
    fp32 = q._load(OUT / "efficientnet-lite0" / "manifest.json")  # noqa: SLF001 - bench
    int8 = q._load(work / tag / "manifest.json")  # noqa: SLF001
    try:
        return {src: q.agreement(fp32, int8, [f for f, n in zip(held, names, strict=True)
                                              if n == src]).value
                for src in sorted(set(names))}
    finally:
        fp32.close()
        int8.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true",
                    help="< 60 s: 6 leading fp32 nodes in EfficientNet-Lite0, no choice, no sweep")
    args = ap.parse_args()
    t0 = time.perf_counter()
    frames, names = _frames()
    n_calib = 32 if args.quick else 64
    settings = q.Settings(fp32_first=6 if args.quick else 0)
    auto = None if args.quick else q.Auto()
    rounds, seconds = (3, 0.5) if args.quick else (7, 1.5)
    calib, held, held_names = _split(frames, names, n_calib)
    out: dict[str, Any] = {"quick": args.quick, "frames": len(frames), "cores": os.cpu_count()}
    quiet = contextlib.redirect_stdout(io.StringIO())  # ORT's calibrators and the engine's logs
    with tempfile.TemporaryDirectory() as tmp, quiet:
        work = Path(tmp)
        eff = _one("efficientnet-lite0", work, settings, calib, held, rounds, seconds,
                   auto=auto)
        yolo_held = held[:: max(1, len(held) // 24)] if args.quick else held
        yolo = _one("yolov8n-like", work, q.Settings(), calib, yolo_held, rounds, seconds)
        out["effnet"], out["yolo"] = eff, yolo
        out["effnet_per_source"] = _per_source(work, "efficientnet-lite0", held, held_names)
        if not args.quick:
            out["sweep"] = []
            for i, (label, fields, n) in enumerate(SWEEP):
                c, h, _ = _split(frames, names, n)
                r = _one("efficientnet-lite0", work, q.Settings(**fields), c, h, 3, 1.0,
                         tag=f"sweep-{i}")
                out["sweep"].append({
                    "settings": label, "calibration_frames": n, "heldout_frames": len(h),
                    "agreement": r["agreement"]["value"],
                    "agreement_confident": r["agreement"]["confident_value"],
                    "int8_fps": r["speed"]["int8_fps"], "fp32_fps": r["speed"]["fp32_fps"],
                    "speedup": r["speed"]["speedup"], "elapsed_s": r["elapsed_s"]})
                print(json.dumps(out["sweep"][-1]), file=sys.stderr, flush=True)
    out["elapsed_s"] = round(time.perf_counter() - t0, 1)
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() \
        else []
    out["loadavg"] = load
    (ROOT / "bench" / "out").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "out" / "int8.json").write_text(json.dumps(out, indent=1) + "\n")
    a = eff["agreement"]
    for name, r in (("effnet", eff), ("yolo", yolo)):
        s = r["speed"]
        print(f"{name}: fp32 {s['fp32_fps']:.1f} fps, int8 {s['int8_fps']:.1f} fps, "
              f"{s['speedup']:.2f}x; agreement {r['agreement']['metric']} "
              f"{r['agreement']['value']:.3f} over {r['agreement']['frames']} held-out frames")
    print("effnet agreement per source: " + " ".join(
        f"{k}={v:.3f}" for k, v in out["effnet_per_source"].items()))
    print(f"int8_speedup_yolo={yolo['speed']['speedup']:.2f} "
          f"int8_speedup_effnet={eff['speed']['speedup']:.2f} "
          f"int8_top1_agreement_effnet={a['value']:.3f} "
          f"int8_top1_agreement_effnet_confident={a['confident_value'] or 0:.3f} "
          f"confident_frames={a['confident_frames']}/{a['frames']} "
          f"int8_fp32_first_effnet={eff['settings']['fp32_first_nodes']} "
          f"elapsed_s={out['elapsed_s']} loadavg={'/'.join(load)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
