"""Helpers for the model-sync tests: model versions, bad artifacts, desired payloads.

Model versions are generated ONNX graphs (``models.generate``) so each test builds the exact
artifacts it needs in a temporary folder in milliseconds. ``stream_nan_model`` is the one model
kind ``models.generate`` has no use for: it passes validation on the synthetic noise frame and
outputs NaN on the test-pattern camera, which is what exercises the switch back after the first
inferences of a new version fail.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import orjson
from onnx import TensorProto, helper, numpy_helper

from edge_agent.contract.manifest import ModelManifest, write_manifest
from models import generate


@dataclass(frozen=True)
class Artifact:
    """One model version on disk: its manifest, ONNX bytes and digests."""

    name: str
    version: str
    manifest_path: Path

    @property
    def manifest_bytes(self) -> bytes:
        return self.manifest_path.read_bytes()

    @property
    def onnx_path(self) -> Path:
        return self.manifest_path.parent / json.loads(self.manifest_bytes)["file"]

    @property
    def onnx_bytes(self) -> bytes:
        return self.onnx_path.read_bytes()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.onnx_bytes).hexdigest()


def version_of(root: Path, name: str, version: str, anchors: int = 64) -> Artifact:
    """A valid YOLOv8-head version; ``anchors`` makes versions differ in bytes."""
    path = generate.yolov8_head(root / f"{name}-{version}", name, version, num_anchors=anchors)
    return Artifact(name, version, path)


def bad_input_shape(root: Path, name: str, version: str) -> Artifact:
    return Artifact(name, version, generate.input_mismatch_model(root / f"{name}-{version}",
                                                                  name, version))


def bad_outputs(root: Path, name: str, version: str) -> Artifact:
    return Artifact(name, version, generate.output_mismatch_model(root / f"{name}-{version}",
                                                                   name, version))


def nan_outputs(root: Path, name: str, version: str) -> Artifact:
    return Artifact(name, version, generate.nan_model(root / f"{name}-{version}", name, version))


def with_bytes(root: Path, base: Artifact, version: str, data: bytes) -> Artifact:
    """A copy of ``base``'s manifest for ``version`` whose file is ``data`` (digest updated).

    For artifacts the engine must refuse although their digest is consistent: a truncated
    file, or bytes that are not ONNX at all.
    """
    d = root / f"{base.name}-{version}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "model.onnx").write_bytes(data)
    m = json.loads(base.manifest_bytes)
    m.update(version=version, file="model.onnx", sha256=hashlib.sha256(data).hexdigest())
    path = write_manifest(d / "manifest.json", ModelManifest.model_validate(m))
    return Artifact(base.name, version, path)


def stream_nan_model(root: Path, name: str, version: str, size: int = 320) -> Artifact:
    """Finite outputs on a noise frame (validation), NaN on the test-pattern camera.

    Output = head * sqrt(mean(blue channel) - 0.45): the validation frame's blue mean is about
    0.49, the pattern's (blue = 96) about 0.40, so the square root is NaN only on the camera.
    """
    n = 64
    labels = list(generate.DEFAULT_LABELS)
    head = np.zeros((1, 4 + len(labels), n), dtype=np.float32)
    head[0, :4, 0] = [50, 50, 20, 20]
    head[0, 4, 0] = 0.9
    nodes = [
        helper.make_node("Slice", ["images", "b_start", "b_end", "b_axis"], ["blue"]),
        helper.make_node("ReduceMean", ["blue"], ["m"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Sub", ["m", "thresh"], ["d"]),
        helper.make_node("Sqrt", ["d"], ["s4"]),
        helper.make_node("Squeeze", ["s4", "sq_axes"], ["s1"]),
        helper.make_node("Reshape", ["s1", "shape3"], ["s"]),
        helper.make_node("Mul", ["head", "s"], ["output0"]),
    ]
    consts = {
        "b_start": np.array([2], np.int64), "b_end": np.array([3], np.int64),
        "b_axis": np.array([1], np.int64), "thresh": np.array(0.45, np.float32),
        "sq_axes": np.array([2, 3], np.int64), "shape3": np.array([-1, 1, 1], np.int64),
        "head": head,
    }
    graph = helper.make_graph(
        nodes, "stream_nan",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["batch", 4 + len(labels),
                                                                      n])],
        initializer=[numpy_helper.from_array(v, name=k) for k, v in consts.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", generate.OPSET)])
    model.ir_version = generate.IR_VERSION
    onnx.checker.check_model(model)
    # a generated head of the same input, labels and output shape gives the manifest; its
    # file is then replaced by this graph (with_bytes updates the digest)
    base = Artifact(name, version, generate.yolov8_head(
        root / f"{name}-{version}", name, version, labels=labels, input_size=(size, size),
        num_anchors=n))
    return with_bytes(root, base, version, model.SerializeToString())


def desired(node: str, generation: int, models: dict[str, dict[str, str]]) -> bytes:
    """A desired-state payload as the hub sends it."""
    return orjson.dumps({"v": 1, "node": node, "generation": generation, "models": models})
