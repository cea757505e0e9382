"""Realistic bad releases, and faithful re-exports, of the real models (issue 13's output gates).

The usual way a model release goes bad is not a slow or crashing graph but a fast one that
answers wrongly: a re-export that swapped RGB and BGR, a manifest whose normalisation does not
match the training, a class list out of order. Such a release passes every latency and error
gate; only comparing its answers with the good version's (shadow agreement, output drift)
stops it. This module derives those releases from the models ``build.py`` has just built, so the
gates can be tested against mistakes that look like the real ones, next to re-exports that
change the bytes but not the answers and must pass.

Each builder reads a built model folder (``model.onnx`` + ``manifest.json``) and writes a
sibling folder with its own manifest: same name and task, its own version, and a description
saying what it imitates. Every variant runs the same operators on the same shapes as its
parent (INT8 aside), so it is as fast as the good one (``bench/releases.py`` measures it).

- ``channel_swap`` (``-bgr``): the first convolution's input channels reversed (R<->B), the
  manifest unchanged: an export that baked the other channel order into the weights.
- ``wrong_normalisation`` (``-norm``): the graph unchanged, the manifest's pixel transform set
  to the schema's defaults (``p / 255``, mean 0, std 1: the YOLO convention) instead of the
  model's own: a hand-written manifest that left ``scale``/``mean``/``std`` out.
- ``sorted_labels`` (``-shuffled``, classifiers): the class list sorted by name instead of by
  class index: a labels file regenerated from a dict or a set.
- ``bgr_native`` (``-reexport``, faithful): the first convolution's input channels reversed
  *and* the manifest's colour order set to BGR, so the agent skips its colour conversion; the
  answers must not change.
- ``int8`` (``-int8``): static QDQ quantisation (onnxruntime.quantization, per-channel weights)
  calibrated on a few sample frames preprocessed exactly as the agent does, by the quantiser
  ``edge-hub models quantize`` uses (``edge_agent.commands.quantize``).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.contract.manifest import (
    MANIFEST_NAME,
    ModelManifest,
    load_manifest,
    write_manifest,
)
from models import generate

#: Sample frames the INT8 calibration reads: the still images and every Nth frame of bikes.mp4.
CALIBRATION_IMAGES = ("chelsea.png", "astronaut.png", "coffee.png")
CALIBRATION_VIDEO = "bikes.mp4"
CALIBRATION_EVERY = 25

Builder = Callable[[Path, Path], Path]


# ------------------------------------------------------------------------------- helpers


def _source(src: Path) -> tuple[ModelManifest, Path]:
    """The parent's manifest and model file; a clear error when the parent is not built."""
    manifest_path = src / MANIFEST_NAME
    if not manifest_path.is_file():
        raise SystemExit(f"models: error: {src} is not built (variants derive from it)")
    manifest = load_manifest(manifest_path)
    return manifest, src / manifest.file


def _release(dst: Path, parent: ModelManifest, model_file: Path, suffix: str,
             what: str, **changes: Any) -> Path:
    """Move ``model_file`` into ``dst`` as ``model.onnx`` and write the variant's manifest.

    The manifest is the parent's with ``changes`` applied, version ``<parent>-<suffix>``, the
    new file's sha256, and a description and source naming the parent and what was changed;
    it goes through the contract's schema like any manifest.
    """
    dst.mkdir(parents=True, exist_ok=True)
    onnx_path = dst / "model.onnx"
    model_file.replace(onnx_path)
    data = parent.model_dump(mode="json")
    data.update(changes)
    data.update(
        version=f"{parent.version}-{suffix}",
        file="model.onnx",
        sha256=generate.sha256_file(onnx_path),
        description=f"{parent.name} {parent.version} variant: {what}",
        source=f"models/variants.py from {parent.name} {parent.version} ({parent.source})",
    )
    return write_manifest(dst / MANIFEST_NAME, ModelManifest.model_validate(data))


def _copy_graph(src_file: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    tmp = dst / "model.onnx.tmp"
    shutil.copyfile(src_file, tmp)
    return tmp


def _reverse_first_conv(src_file: Path, dst: Path) -> Path:
    """A copy of the graph with the first convolution's input channels reversed (RGB<->BGR).

    ONNX nodes are stored in topological order, so the first ``Conv`` is the one the image
    reaches first; its weight ``[out, 3, kh, kw]`` must be an initializer.
    """
    import onnx  # build-only dependency
    from onnx import numpy_helper

    model = onnx.load(str(src_file))
    conv = next((n for n in model.graph.node if n.op_type == "Conv"), None)
    if conv is None:
        raise SystemExit(f"models: error: {src_file} has no Conv node")
    inits = {i.name: i for i in model.graph.initializer}
    weight = inits.get(conv.input[1])
    if weight is None or len(weight.dims) != 4 or weight.dims[1] != 3:
        raise SystemExit(f"models: error: {src_file}: the first Conv's weight is not an "
                         "[out, 3, kh, kw] initializer")
    w = numpy_helper.to_array(weight)
    weight.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w[:, ::-1]), weight.name))
    onnx.checker.check_model(model)
    dst.mkdir(parents=True, exist_ok=True)
    tmp = dst / "model.onnx.tmp"
    onnx.save(model, str(tmp))
    return tmp


# ------------------------------------------------------------------------------ builders


def channel_swap(src: Path, dst: Path) -> Path:
    """Bad: first conv's input channels reversed, manifest unchanged (RGB/BGR swapped)."""
    parent, model_file = _source(src)
    return _release(dst, parent, _reverse_first_conv(model_file, dst), "bgr",
                    "first conv's input channels reversed (R<->B), manifest unchanged: "
                    "imitates a re-export that swapped RGB and BGR (bad release)")


def wrong_normalisation(src: Path, dst: Path) -> Path:
    """Bad: the graph unchanged, the manifest's pixel transform left at the schema defaults."""
    parent, model_file = _source(src)
    spec = parent.input.model_dump(mode="json")
    spec.update(scale=1.0 / 255.0, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
    if spec == parent.input.model_dump(mode="json"):
        raise SystemExit(f"models: error: {src} already uses p/255 (no wrong normalisation)")
    return _release(dst, parent, _copy_graph(model_file, dst), "norm",
                    "manifest normalises p/255 (mean 0, std 1: the schema defaults, the YOLO "
                    "convention) instead of the model's own: imitates a hand-written manifest "
                    "that left scale/mean/std out (bad release)", input=spec)


def sorted_labels(src: Path, dst: Path) -> Path:
    """Bad (classifiers): the class list sorted by name instead of by class index."""
    parent, model_file = _source(src)
    labels = sorted(parent.labels, key=str.lower)
    moved = sum(a != b for a, b in zip(labels, parent.labels, strict=True))
    if moved < len(labels) // 2:
        raise SystemExit(f"models: error: {src}: sorting moves only {moved} labels")
    return _release(dst, parent, _copy_graph(model_file, dst), "shuffled",
                    f"class list sorted by name ({moved} of {len(labels)} labels moved), graph "
                    "unchanged: imitates a labels file regenerated from a dict (bad release)",
                    labels=labels)


def bgr_native(src: Path, dst: Path) -> Path:
    """Faithful: first conv's input channels reversed and the manifest's colour order flipped."""
    parent, model_file = _source(src)
    spec = parent.input.model_dump(mode="json")
    spec["color"] = "BGR" if parent.input.color == "RGB" else "RGB"
    return _release(dst, parent, _reverse_first_conv(model_file, dst), "reexport",
                    f"first conv's input channels reversed and the manifest's colour order set "
                    f"to {spec['color']} to match: a faithful re-export that skips the colour "
                    "conversion (must agree with the original)", input=spec)


def calibration_frames(samples: Path) -> Iterator[np.ndarray]:
    """BGR frames the INT8 calibration sees: the sample images and every Nth video frame."""
    import cv2

    for name in CALIBRATION_IMAGES:
        img = cv2.imread(str(samples / name), cv2.IMREAD_COLOR)
        if img is None:
            raise SystemExit(f"models: error: cannot read {samples / name}")
        yield img
    cap = cv2.VideoCapture(str(samples / CALIBRATION_VIDEO), cv2.CAP_FFMPEG)
    try:
        i = 0
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            if i % CALIBRATION_EVERY == 0:
                yield frame
            i += 1
    finally:
        cap.release()


def int8(src: Path, dst: Path) -> Path:
    """Static QDQ INT8 (per-channel weights, MinMax ranges), calibrated on sample frames.

    The quantiser is ``edge-hub models quantize``'s (``edge_agent.commands.quantize``); MinMax
    rather than its percentile default keeps this variant the one the shadow tests measured.
    """
    from edge_agent.commands import quantize as quantiser

    parent, _ = _source(src)
    frames = list(calibration_frames(src.parent / "samples"))
    manifest = quantiser.quantize(
        src, dst, frames, quantiser.Settings(per_channel=True, calibration="minmax"),
        version=f"{parent.version}-int8",
        description=f"{parent.name} {parent.version} variant: static QDQ INT8 (per-channel "
        f"weights, MinMax ranges) calibrated on {len(frames)} sample frames with "
        "onnxruntime.quantization",
    )
    return _release_manifest(manifest, parent)


def _release_manifest(manifest_path: Path, parent: ModelManifest) -> Path:
    """Set the source line the other variants carry (``models/variants.py from ...``)."""
    data = load_manifest(manifest_path).model_dump(mode="json")
    data["source"] = f"models/variants.py from {parent.name} {parent.version} ({parent.source})"
    return write_manifest(manifest_path, ModelManifest.model_validate(data))


#: (folder = build step, parent folder, builder) for every variant ``build.py`` makes.
VARIANTS: tuple[tuple[str, str, Builder], ...] = (
    ("efficientnet-lite0-bgr", "efficientnet-lite0", channel_swap),
    ("efficientnet-lite0-norm", "efficientnet-lite0", wrong_normalisation),
    ("efficientnet-lite0-shuffled", "efficientnet-lite0", sorted_labels),
    ("efficientnet-lite0-reexport", "efficientnet-lite0", bgr_native),
    ("efficientnet-lite0-int8", "efficientnet-lite0", int8),
    ("centerface-bgr", "centerface", channel_swap),
    ("centerface-norm", "centerface", wrong_normalisation),
    ("centerface-reexport", "centerface", bgr_native),
)


def steps() -> list[tuple[str, str, Callable[[Path], Path]]]:
    """(step name, parent step, function of the output folder) for ``build.py``."""

    def step(name: str, parent: str, fn: Builder) -> Callable[[Path], Path]:
        return lambda out: fn(out / parent, out / name)

    return [(name, parent, step(name, parent, fn)) for name, parent, fn in VARIANTS]
