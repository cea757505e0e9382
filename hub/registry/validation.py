"""Checks an upload must pass before the registry accepts it: manifest shape, ONNX load, fit.

The hub may not import the agent's manifest model (only ``edge_agent.contract.protocol``), so this
module
checks the fields the agent's ``ModelManifest`` relies on, with the same names, and leaves any
other field alone (the agent adds postprocess parameters without the hub having to follow).
A model that the agent would refuse to load should be refused here first, at push time, where
a person is watching, rather than on a hundred nodes during a rollout.

``check_onnx`` is blocking (onnxruntime parses and builds the graph): call it in a thread.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from edge_agent.contract.protocol import SHA256_PATTERN, is_valid_name, is_valid_version
from hub.errors import ArtifactRejected

#: Largest manifest accepted, bytes. ImageNet's 1000 labels are ~20 KB; 1 MiB is ample.
MAX_MANIFEST_BYTES = 1024 * 1024
TASKS = ("classification", "yolo", "centerface")
LAYOUTS = ("NCHW", "NHWC")
COLORS = ("RGB", "BGR")
_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")
_SHA_RE = re.compile(SHA256_PATTERN)
#: Largest input side the agent is expected to feed, pixels.
MAX_SIDE = 16384


class ManifestInvalid(ArtifactRejected):
    """The manifest is not JSON or lacks a field the agent needs."""

    code = "manifest_invalid"


class ManifestMismatch(ArtifactRejected):
    """The manifest does not describe the uploaded model (digest, input, outputs, name)."""

    code = "manifest_mismatch"


class NotOnnx(ArtifactRejected):
    """The upload does not parse or load as an ONNX model in onnxruntime."""

    code = "not_onnx"


@dataclass(frozen=True)
class ManifestFacts:
    """What the hub keeps from a checked manifest (the full bytes are stored verbatim)."""

    data: dict[str, Any]
    name: str
    version: str
    task: str
    sha256: str


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ManifestInvalid("manifest: " + msg)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_manifest(raw: bytes) -> ManifestFacts:
    """Parse and check a manifest; raise ManifestInvalid naming the first bad field."""
    _need(len(raw) <= MAX_MANIFEST_BYTES, f"larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ManifestInvalid(f"manifest is not JSON: {exc}") from exc
    _need(isinstance(data, dict), "must be a JSON object")
    name, version, task = data.get("name"), data.get("version"), data.get("task")
    _need(isinstance(name, str) and is_valid_name(name), "name: missing or not a valid name")
    _need(
        isinstance(version, str) and is_valid_version(version),
        "version: missing or not a valid version",
    )
    _need(task in TASKS, f"task: must be one of {', '.join(TASKS)}")
    file = data.get("file")
    _need(
        isinstance(file, str) and bool(_FILE_RE.match(file)) and ".." not in file,
        "file: missing or not a plain file name",
    )
    sha = data.get("sha256")
    _need(isinstance(sha, str) and bool(_SHA_RE.match(sha)), "sha256: missing or not 64 hex")
    _check_input(data.get("input"))
    labels = data.get("labels")
    _need(
        isinstance(labels, list) and all(isinstance(x, str) and len(x) <= 256 for x in labels),
        "labels: must be a list of strings",
    )
    outputs = data.get("outputs")
    _need(isinstance(outputs, list) and len(outputs) > 0, "outputs: must be a non-empty list")
    for i, out in enumerate(outputs):
        _need(isinstance(out, dict), f"outputs[{i}]: must be an object")
        _need(isinstance(out.get("name"), str) and out["name"] != "", f"outputs[{i}].name")
        shape = out.get("shape")
        _need(
            isinstance(shape, list)
            and all(d is None or _is_int(d) or isinstance(d, str) for d in shape),
            f"outputs[{i}].shape: must be a list of ints, strings or nulls",
        )
    post = data.get("postprocess")
    _need(post is None or isinstance(post, dict), "postprocess: must be an object")
    return ManifestFacts(data=data, name=name, version=version, task=task, sha256=sha)


def _check_input(inp: Any) -> None:
    _need(isinstance(inp, dict), "input: must be an object")
    _need(isinstance(inp.get("name"), str) and inp["name"] != "", "input.name: missing")
    for side in ("width", "height"):
        v = inp.get(side)
        _need(_is_int(v) and 0 < v <= MAX_SIDE, f"input.{side}: must be an int in 1..{MAX_SIDE}")
    _need(inp.get("layout") in LAYOUTS, "input.layout: must be NCHW or NHWC")
    if "color" in inp:
        _need(inp["color"] in COLORS, "input.color: must be RGB or BGR")
    for key in ("mean", "std"):
        if key in inp:
            v = inp[key]
            _need(
                isinstance(v, list) and len(v) == 3 and all(_is_num(x) for x in v),
                f"input.{key}: must be three numbers",
            )
    if "std" in inp:
        _need(all(x != 0 for x in inp["std"]), "input.std: must not contain 0")
    if "scale" in inp:
        _need(_is_num(inp["scale"]) and inp["scale"] > 0, "input.scale: must be a positive number")
    if "letterbox" in inp:
        _need(isinstance(inp["letterbox"], bool), "input.letterbox: must be true or false")
    if "batch" in inp:
        b = inp["batch"]
        _need(b == "dynamic" or (_is_int(b) and b >= 1), "input.batch: 'dynamic' or an int >= 1")


def _dims_differ(a: Any, b: Any) -> bool:
    """True when both dims are fixed (positive ints) and different; symbolic dims match all."""
    return _is_int(a) and _is_int(b) and a > 0 and b > 0 and a != b


def check_onnx(path: Path, manifest: dict[str, Any]) -> None:
    """Load ``path`` in onnxruntime and check it against the manifest (blocking).

    Raises NotOnnx when onnxruntime cannot load it, ManifestMismatch when its input or outputs
    disagree with the manifest.
    """
    import onnxruntime as ort  # noqa: PLC0415 - heavy; loaded only to check an upload

    opts = ort.SessionOptions()
    # only the graph's validity and signature matter here: skip optimisation and arenas to
    # keep the load fast and the hub's memory flat
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.enable_cpu_mem_arena = False
    opts.enable_mem_pattern = False
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises several unrelated types for bad files
        detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise NotOnnx(f"not a loadable ONNX model: {detail}") from exc
    try:
        _check_signature(sess, manifest)
    finally:
        del sess


def _check_signature(sess: Any, manifest: dict[str, Any]) -> None:
    inputs = sess.get_inputs()
    if len(inputs) != 1:
        raise ManifestMismatch(f"the model has {len(inputs)} inputs; the agent feeds exactly one")
    _check_input_tensor(inputs[0].name, list(inputs[0].shape), manifest["input"])
    model_outs = {o.name: list(o.shape) for o in sess.get_outputs()}
    _check_outputs(model_outs, manifest)


def _check_input_tensor(name: str, shape: list[Any], inp: dict[str, Any]) -> None:
    if name != inp["name"]:
        raise ManifestMismatch(
            f"input name: manifest says {inp['name']!r}, the model's input is {name!r}"
        )
    if len(shape) != 4:
        raise ManifestMismatch(f"input {name!r} has rank {len(shape)}, expected 4")
    c, h, w = (1, 2, 3) if inp["layout"] == "NCHW" else (3, 1, 2)
    expect = {"channels": (shape[c], 3), "height": (shape[h], inp["height"]),
              "width": (shape[w], inp["width"])}
    for what, (model_dim, want) in expect.items():
        if _dims_differ(model_dim, want):
            raise ManifestMismatch(
                f"input {what}: the model has {model_dim}, the manifest ({inp['layout']}) "
                f"implies {want}"
            )
    batch = inp.get("batch", "dynamic")
    if batch == "dynamic" and _is_int(shape[0]) and shape[0] > 0:
        raise ManifestMismatch(
            f"input batch: the manifest says dynamic, the model's batch is fixed at {shape[0]}"
        )
    if _is_int(batch) and _dims_differ(shape[0], batch):
        raise ManifestMismatch(f"input batch: the model has {shape[0]}, the manifest {batch}")


def _check_outputs(model_outs: dict[str, list[Any]], manifest: dict[str, Any]) -> None:
    for i, out in enumerate(manifest["outputs"]):
        if out["name"] not in model_outs:
            raise ManifestMismatch(
                f"outputs[{i}]: the model has no output {out['name']!r} "
                f"(it has {', '.join(sorted(model_outs))})"
            )
        got, want = model_outs[out["name"]], out["shape"]
        if len(got) != len(want) or any(
            _dims_differ(g, w) for g, w in zip(got, want, strict=True)
        ):
            raise ManifestMismatch(
                f"outputs[{i}] {out['name']!r}: the model's shape is {got}, the manifest's {want}"
            )
    labels = manifest.get("labels") or []
    if manifest.get("task") == "classification" and labels:
        last = model_outs[manifest["outputs"][0]["name"]][-1:]
        if last and _is_int(last[0]) and last[0] > 0 and last[0] != len(labels):
            raise ManifestMismatch(
                f"labels: {len(labels)} labels for a classifier with {last[0]} classes"
            )
