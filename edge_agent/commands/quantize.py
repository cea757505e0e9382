"""INT8 from fp32, measured: the engine half of ``edge-hub models quantize`` (no hub involved).

``quantize`` runs ONNX Runtime's static quantisation (QDQ) on a model folder, calibrated on
frames preprocessed by the agent's own ``Preprocessor`` for that manifest, so the ranges it
learns are the ranges the agent will feed. ``agreement`` and ``speed`` then load both versions
with the agent's engine (``LoadedModel``: same providers, threads, post-processing), compare
them with the shadow gate's agreement (``edge_agent.streaming.shadow.agreement``) and time both
in interleaved rounds. ``choose`` picks how many leading compute nodes stay fp32 per model by
measuring candidates on the calibration frames (``Auto``). ``run`` does it all, measures the
result on held-out frames and returns the report the hub stores
(``edge_agent.contract.quantization``).

Why here: it needs the agent's pre-processing, engine and agreement, which the hub may not
import; ``hub.commands.quantize`` (a client verb, never the server) imports this module lazily,
the one exception the import contracts list (pyproject.toml). ``models/variants.py`` and
``bench/int8.py`` use it too, so there is one implementation.

Frames: ``read_frames`` takes an image, a video, or a folder of both; ``split`` spreads the
calibration frames evenly over them and keeps every other frame as held-out.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, TypeVar

import cv2
import numpy as np
import onnxruntime as ort

from edge_agent.app import images
from edge_agent.config import EngineSettings
from edge_agent.contract import graph
from edge_agent.contract import quantization as qr
from edge_agent.contract.manifest import MANIFEST_NAME, ModelManifest, load_manifest, write_manifest
from edge_agent.errors import InputError, ModelError
from edge_agent.inference.engine import LoadedModel
from edge_agent.inference.preprocess import Preprocessor
from edge_agent.streaming.shadow import agreement as frame_agreement

_T = TypeVar("_T")

#: File suffixes read as still images and as videos.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v")
#: Largest image read, pixels (a bigger one is refused by its header before decoding).
MAX_PIXELS = 40_000_000
#: A classifier's fp32 top-1 score from which a frame counts as "confident".
CONFIDENT_SCORE = 0.3


class QuantizeError(Exception):
    """Bad input for quantisation: no frames, an unreadable file, a model that will not load."""


@dataclass(frozen=True)
class Settings:
    """``quantize_static`` choices. docs/registry.md has the measurements behind the defaults
    on EfficientNet-Lite0: per-tensor weights drop top-1 agreement from 0.89 to 0.57; what
    lifts it from 0.89 to 0.96 is keeping the first few compute nodes in fp32 (``Auto``
    picks how many per model), and with those in fp32 MinMax ranges do as well as any."""

    per_channel: bool = True
    calibration: Literal["minmax", "entropy", "percentile"] = "minmax"
    percentile: float = 99.999
    #: Op types kept in fp32 (``nodes_to_exclude`` by type).
    fp32_op_types: tuple[str, ...] = ()
    #: The first N compute nodes (``COMPUTE_OPS``, graph order) kept in fp32.
    fp32_first: int = 0
    #: Activations asymmetric uint8 (ReLU6 outputs are non-negative) or symmetric int8.
    activations: Literal["QUInt8", "QInt8"] = "QUInt8"
    #: 7-bit weights (for CPUs without VNNI, where u8 x s8 pairs can saturate).
    reduce_range: bool = False

    def report(self, fp32_nodes: Sequence[str] = ()) -> qr.QuantSettings:
        """The settings as the report states them (``fp32_nodes``: the names excluded, the
        first 64, each cut to 128 characters, so the report stays far below the hub's limit)."""
        return qr.QuantSettings(
            per_channel=self.per_channel, calibration=self.calibration,
            percentile=self.percentile if self.calibration == "percentile" else None,
            fp32_op_types=list(self.fp32_op_types), fp32_first_nodes=self.fp32_first,
            fp32_nodes=[n[:128] for n in fp32_nodes[:64]], activations=self.activations,
            reduce_range=self.reduce_range,
        )


#: The ops counted by ``Settings.fp32_first``: where the multiply-adds are.
COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class Auto:
    """Choose ``Settings.fp32_first`` by measurement (``choose``): each candidate, from
    all-INT8 up, is quantised and compared with fp32 on the calibration frames; the first whose
    agreement reaches ``target`` while its speed-up stays >= ``min_speedup`` is kept."""

    target: float = 0.95
    min_speedup: float = 1.3
    candidates: tuple[int, ...] = (0, 3, 6, 9, 12)


# ---------------------------------------------------------------------------------- frames


def _image(path: Path) -> np.ndarray:
    """The BGR image, its size read from the header and refused over ``MAX_PIXELS`` before
    anything is decoded (``app.images``: a small PNG can inflate to gigabytes)."""

    try:
        return images.decode(path.read_bytes(), MAX_PIXELS)
    except (OSError, InputError) as exc:
        raise QuantizeError(f"{path}: {exc}") from exc


def _video(path: Path, limit: int) -> Iterator[np.ndarray]:
    """Up to ``limit`` frames spread evenly over the clip (every frame when it is short)."""
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    if not cap.isOpened():
        raise QuantizeError(f"cannot open video {path}")
    try:
        total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        step = max(1, total // limit) if total > 0 else 1
        i = n = 0
        while n < limit:
            ok, frame = cap.read()
            if not ok:
                break
            if i % step == 0:
                n += 1
                yield frame
            i += 1
    finally:
        cap.release()


def read_frames(sources: Sequence[Path], limit: int = 2000) -> list[np.ndarray]:
    """BGR frames of the images and videos given (files, or folders read sorted by name).

    At most ``limit`` frames in all; each video gives its share evenly spread. Raises
    ``QuantizeError`` for a missing path or when no frame is found.
    """
    files: list[Path] = []
    for src in sources:
        if src.is_dir():
            files += sorted(p for p in src.iterdir()
                            if p.suffix.lower() in IMAGE_SUFFIXES + VIDEO_SUFFIXES)
        elif src.is_file():
            files.append(src)
        else:
            raise QuantizeError(f"no such file or folder: {src}")
    images = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
    videos = [f for f in files if f.suffix.lower() in VIDEO_SUFFIXES]
    unknown = [f for f in files if f not in images and f not in videos]
    if unknown:
        raise QuantizeError(f"{unknown[0]}: not an image or video suffix "
                            f"({', '.join(IMAGE_SUFFIXES + VIDEO_SUFFIXES)})")
    frames = [_image(f) for f in images[:limit]]
    share = (limit - len(frames)) // max(1, len(videos))
    for v in videos:
        frames += list(_video(v, share))
    if not frames:
        raise QuantizeError(f"no frames in {', '.join(str(s) for s in sources)}")
    return frames


def split(frames: Sequence[_T], calibration: int,
          heldout: int | None = None) -> tuple[list[_T], list[_T]]:
    """(calibration, held-out): ``calibration`` frames evenly spread, the rest held out.

    Neither set contains a frame of the other. With fewer than ``2 * calibration`` frames the
    calibration set gets half of them. ``heldout`` caps the held-out set (evenly spread).
    """
    if len(frames) < 2:
        raise QuantizeError(f"need at least 2 frames (one to calibrate, one to check), "
                            f"got {len(frames)}")
    n = max(1, min(calibration, len(frames) // 2))
    picked = set(np.linspace(0, len(frames) - 1, n).round().astype(int).tolist())
    calib = [f for i, f in enumerate(frames) if i in picked]
    rest = [f for i, f in enumerate(frames) if i not in picked]
    if heldout is not None and len(rest) > heldout:
        keep = np.linspace(0, len(rest) - 1, heldout).round().astype(int)
        rest = [rest[i] for i in keep]
    return calib, rest


# ------------------------------------------------------------------------------ quantising


def quantize(src: Path, dst: Path, frames: Sequence[np.ndarray], settings: Settings,
             *, version: str, description: str = "") -> Path:
    """Write ``dst/model.onnx`` (INT8 QDQ) and ``dst/manifest.json`` (``version``); return the
    manifest path. ``src`` is the fp32 model folder or its manifest."""
    return quantize_nodes(src, dst, frames, settings, version=version,
                          description=description)[0]


def quantize_nodes(src: Path, dst: Path, frames: Sequence[np.ndarray], settings: Settings,
                   *, version: str, description: str = "") -> tuple[Path, list[str]]:
    """``quantize``, also returning the names of the nodes left in fp32."""
    # onnxruntime.quantization needs the onnx package, which only this tool needs
    from onnxruntime import quantization as q  # noqa: PLC0415
    from onnxruntime.quantization.shape_inference import quant_pre_process  # noqa: PLC0415

    manifest_path = src / MANIFEST_NAME if src.is_dir() else src
    parent = load_manifest(manifest_path)
    pre = Preprocessor(parent.input)
    tensors = [pre(f)[0] for f in frames]
    if not tensors:
        raise QuantizeError("no calibration frames")
    methods = {"minmax": q.CalibrationMethod.MinMax, "entropy": q.CalibrationMethod.Entropy,
               "percentile": q.CalibrationMethod.Percentile}
    if settings.calibration not in methods:
        raise QuantizeError(f"calibration method {settings.calibration!r}: "
                            f"one of {', '.join(methods)}")

    class Reader(q.CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._it = iter(tensors)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self._it, None)
            return None if x is None else {parent.input.name: x}

    dst.mkdir(parents=True, exist_ok=True)
    out = dst / "model.onnx"
    with tempfile.TemporaryDirectory(dir=dst) as work:
        prepared = Path(work) / "prepared.onnx"
        try:
            # ONNX shape inference and graph clean-up first, as onnxruntime's quantisation docs
            # advise. Its symbolic shape inference is for transformers' dynamic shapes; it
            # fails on CenterFace (and then writes a file into the working folder), and ONNX's
            # own inference gives the CNNs here every shape the quantiser needs.
            quant_pre_process(str(manifest_path.parent / parent.file), str(prepared),
                              skip_symbolic_shape=True)
            _at_least_opset_13(prepared)
            fp32_nodes = _fp32_nodes(prepared, settings)
            # the calibrators print progress on stdout, which carries the verb's --json
            with contextlib.redirect_stdout(io.StringIO()):
                q.quantize_static(
                    str(prepared), str(out), Reader(), quant_format=q.QuantFormat.QDQ,
                    per_channel=settings.per_channel, reduce_range=settings.reduce_range,
                    activation_type=getattr(q.QuantType, settings.activations),
                    weight_type=q.QuantType.QInt8,
                    calibrate_method=methods[settings.calibration],
                    nodes_to_exclude=fp32_nodes,
                    extra_options={"CalibPercentile": settings.percentile,
                                   "ActivationSymmetric": settings.activations == "QInt8"},
                )
        except Exception as exc:  # onnx and onnxruntime raise many types, Exception among them
            raise QuantizeError(f"{parent.name} {parent.version} could not be quantised: "
                                f"{graph.one_line(exc)}") from exc
    return _write_manifest(dst, parent, out, version, description or (
        f"INT8 (static QDQ, {'per-channel' if settings.per_channel else 'per-tensor'} weights, "
        f"{settings.calibration} ranges, {len(tensors)} calibration frames, "
        f"{len(fp32_nodes)} nodes in fp32) of {parent.name} {parent.version}")), fp32_nodes


def _at_least_opset_13(model_file: Path) -> None:
    """Convert the graph to opset 13 in place when older: per-channel DequantizeLinear (its
    ``axis``) needs 13, and the quantiser keeps an opset-11 graph's version (CenterFace)."""
    import onnx  # noqa: PLC0415 - see quantize()
    from onnx import version_converter  # noqa: PLC0415

    model = onnx.load(str(model_file))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    if opset < 13:
        onnx.save(version_converter.convert_version(model, 13), str(model_file))


def _fp32_nodes(model_file: Path, settings: Settings) -> list[str]:
    """Names of the nodes of ``settings.fp32_op_types`` and of its first ``fp32_first``
    compute nodes (graph order, which ONNX requires to be topological).

    The quantiser excludes nodes by name, and exports often leave names empty (CenterFace:
    119 of 122), where excluding ``""`` would keep every unnamed node in fp32: unnamed nodes
    get a unique name first (the file is rewritten in place).
    """
    if not settings.fp32_op_types and settings.fp32_first <= 0:
        return []
    import onnx  # noqa: PLC0415 - see quantize()

    model = onnx.load(str(model_file))
    nodes = model.graph.node
    if any(not n.name for n in nodes):
        taken = {n.name for n in nodes}
        for i, n in enumerate(nodes):
            if not n.name:
                n.name = next(name for k in range(len(nodes) + 1)
                              if (name := f"{n.op_type}_{i}" + (f"_{k}" if k else ""))
                              not in taken)
                taken.add(n.name)
        onnx.save(model, str(model_file))
    lead = {n.name for n in [n for n in nodes if n.op_type in COMPUTE_OPS][:settings.fp32_first]}
    return [n.name for n in nodes if n.op_type in settings.fp32_op_types or n.name in lead]


def _write_manifest(dst: Path, parent: ModelManifest, onnx_file: Path, version: str,
                    description: str) -> Path:
    data = parent.model_dump(mode="json")
    data.update(
        version=version, file=onnx_file.name,
        sha256=hashlib.sha256(onnx_file.read_bytes()).hexdigest(),
        description=description,
        source=f"edge-hub models quantize from {parent.name} {parent.version} "
               f"({parent.sha256[:12]})",
    )
    return write_manifest(dst / MANIFEST_NAME, ModelManifest.model_validate(data))


# ------------------------------------------------------------------------------ measuring


def _load(manifest_path: Path) -> LoadedModel:
    try:
        return LoadedModel.load(manifest_path, EngineSettings(providers=["cpu"],
                                                              intra_op_threads=1))
    except ModelError as exc:
        raise QuantizeError(f"{manifest_path}: {exc}") from exc


def agreement(fp32: LoadedModel, int8: LoadedModel, frames: Sequence[np.ndarray]) -> qr.Agreement:
    """Per-frame agreement of two loaded models (``LoadedModel``) on ``frames``, averaged."""
    scores: list[float] = []
    confident: list[float] = []
    classes = fp32.task == "classification"
    for f in frames:
        a, b = fp32.infer(f).output, int8.infer(f).output
        s = frame_agreement(a, b)
        scores.append(s)
        if classes and a.get("classes") and a["classes"][0]["score"] >= CONFIDENT_SCORE:
            confident.append(s)
    return qr.Agreement(
        metric="top1" if classes else "box_f1",
        value=float(np.mean(scores)) if scores else 0.0, frames=len(scores),
        confident_min_score=CONFIDENT_SCORE if classes else None,
        confident_value=float(np.mean(confident)) if classes and confident else None,
        confident_frames=len(confident) if classes else None,
    )


def _fps(model: LoadedModel, tensors: Sequence[np.ndarray], seconds: float) -> float:
    n, t0 = 0, time.perf_counter()
    while True:
        for x in tensors:
            model.run(x)
            n += 1
        if (t := time.perf_counter() - t0) >= seconds:
            return n / t


def speed(fp32: LoadedModel, int8: LoadedModel, frames: Sequence[np.ndarray], *, rounds: int = 5,
          seconds: float = 1.0) -> qr.Speed:
    """fp32 vs INT8 ``run`` fps, interleaved: each round times both (order alternating), so a
    noisy neighbour slows both alike; the speed-up is the median of the per-round ratios."""
    xs = [fp32.preprocess(f)[0] for f in frames[:16]]
    xi = [int8.preprocess(f)[0] for f in frames[:16]]
    f_fps: list[float] = []
    i_fps: list[float] = []
    for r in range(rounds):
        if r % 2:
            i_fps.append(_fps(int8, xi, seconds))
            f_fps.append(_fps(fp32, xs, seconds))
        else:
            f_fps.append(_fps(fp32, xs, seconds))
            i_fps.append(_fps(int8, xi, seconds))
    ratios = [i / f for i, f in zip(i_fps, f_fps, strict=True)]
    return qr.Speed(fp32_fps=float(np.median(f_fps)), int8_fps=float(np.median(i_fps)),
                    speedup=float(np.median(ratios)), rounds=rounds, intra_op_threads=1,
                    cpu=_cpu_name(), cores=os.cpu_count() or 1)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()[:256]
    except OSError:
        pass
    return platform.processor()[:256]


def choose(src: Path, work: Path, calibration: Sequence[np.ndarray], settings: Settings,
           auto: Auto, *, version: str) -> tuple[Settings, qr.Selection, Path, list[str]]:
    """Try ``auto.candidates`` fp32 leading nodes in turn; return the settings kept, the
    record of what was tried, the kept candidate's folder (under ``work``) and its fp32
    nodes.

    Each candidate is measured on the calibration frames only (agreement with fp32, and a
    short interleaved speed-up), so the held-out frames stay unseen until the report. A
    candidate slower than ``auto.min_speedup`` ends the search: more fp32 is only slower.
    """
    fp32 = _load(src / MANIFEST_NAME if src.is_dir() else src)
    tried: list[tuple[Settings, qr.Candidate, Path, list[str]]] = []
    try:
        for n in sorted(set(auto.candidates)):
            s = replace(settings, fp32_first=n)
            folder = work / f"fp32-first-{n}"
            manifest_path, names = quantize_nodes(src, folder, calibration, s,
                                                  version=version)
            int8 = _load(manifest_path)
            try:
                c = qr.Candidate(
                    fp32_first_nodes=n, agreement=agreement(fp32, int8, calibration).value,
                    speedup=speed(fp32, int8, calibration, rounds=3, seconds=0.5).speedup)
            finally:
                int8.close()
            if c.speedup < auto.min_speedup and tried:
                break
            tried.append((s, c, folder, names))
            if c.agreement >= auto.target and c.speedup >= auto.min_speedup:
                break
    finally:
        fp32.close()
    met = tried[-1][1].agreement >= auto.target and tried[-1][1].speedup >= auto.min_speedup
    # none met: the best agreement (the fewest fp32 nodes among equals)
    kept = tried[-1] if met else max(tried, key=lambda t: (t[1].agreement, -t[0].fp32_first))
    return kept[0], qr.Selection(
        target_agreement=auto.target, min_speedup=auto.min_speedup, frames=len(calibration),
        candidates=[t[1] for t in tried], met=met), kept[2], kept[3]


def run(src: Path, dst: Path, *, version: str, calibration: Sequence[np.ndarray],
        heldout: Sequence[np.ndarray], settings: Settings, sources: tuple[str, str],
        rounds: int = 5, seconds: float = 1.0, auto: Auto | None = None,
        ) -> qr.QuantizationReport:
    """Quantise ``src`` into ``dst`` as ``version``, then measure it against ``src``.

    ``sources`` names where the calibration and held-out frames came from (for the report).
    With ``auto``, ``settings.fp32_first`` is chosen by ``choose`` first.
    """
    if not heldout:
        raise QuantizeError("no held-out frames to measure the agreement on")
    t0 = time.perf_counter()
    selection = None
    if auto is None:
        manifest_path, fp32_nodes = quantize_nodes(src, dst, calibration, settings,
                                                   version=version)
    else:
        dst.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dst) as work:
            settings, selection, kept, fp32_nodes = choose(
                src, Path(work), calibration, settings, auto, version=version)
            for f in (kept / "model.onnx", kept / MANIFEST_NAME):
                shutil.copyfile(f, dst / f.name)
        manifest_path = dst / MANIFEST_NAME
    fp32 = _load(src / MANIFEST_NAME if src.is_dir() else src)
    int8 = _load(manifest_path)
    try:
        agree = agreement(fp32, int8, heldout)
        fast = speed(fp32, int8, heldout, rounds=rounds, seconds=seconds)
    finally:
        fp32.close()
        int8.close()
    return qr.QuantizationReport(
        parent_version=fp32.version, parent_sha256=fp32.sha256, onnxruntime=ort.__version__,
        settings=settings.report(fp32_nodes),
        calibration=qr.FrameSet(frames=len(calibration), source=sources[0][:1024]),
        heldout=qr.FrameSet(frames=len(heldout), source=sources[1][:1024]),
        agreement=agree, speed=fast, elapsed_s=round(time.perf_counter() - t0, 1),
        selection=selection,
    )
