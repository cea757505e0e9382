"""Tiny real ONNX classifiers and their manifests, for the registry tests.

Built with the ``onnx`` helper API so the registry tests do not depend on models/build.py. The
graph is a real classifier (global average pool, then a 3×K matmul); ``pad_bytes`` adds a
weight tensor that feeds the output through a zero multiply, to make large artifacts that
onnxruntime still loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from models.generate import sha256_file


def make_classifier(
    path: Path,
    *,
    classes: int = 4,
    size: int = 32,
    batch: int | str = "N",
    input_name: str = "images",
    output_name: str = "logits",
    pad_bytes: int = 0,
    seed: int = 0,
) -> Path:
    """Write a [batch,3,size,size] -> [batch,classes] classifier to ``path``."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((3, classes)).astype(np.float32), "w")
    nodes = [
        helper.make_node("GlobalAveragePool", [input_name], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w"], ["mm"] if pad_bytes else [output_name]),
    ]
    inits = [w]
    if pad_bytes:
        pad = numpy_helper.from_array(np.ones(max(1, pad_bytes // 4), dtype=np.float32), "pad")
        zero = numpy_helper.from_array(np.zeros((), dtype=np.float32), "zero")
        inits += [pad, zero]
        nodes += [
            helper.make_node("ReduceSum", ["pad"], ["padsum"], keepdims=0),
            helper.make_node("Mul", ["padsum", "zero"], ["padzero"]),
            helper.make_node("Add", ["mm", "padzero"], [output_name]),
        ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, 3, size, size])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [batch, classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def make_manifest(
    onnx_path: Path,
    *,
    name: str = "tiny",
    version: str = "1",
    classes: int = 4,
    size: int = 32,
    batch: int | str = "dynamic",
    **overrides: Any,
) -> dict[str, Any]:
    """A manifest that matches ``make_classifier``'s model at ``onnx_path``."""
    m: dict[str, Any] = {
        "name": name,
        "version": version,
        "task": "classification",
        "file": onnx_path.name,
        "sha256": sha256_file(onnx_path),
        "input": {
            "name": "images", "width": size, "height": size, "layout": "NCHW", "color": "RGB",
            "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "scale": 1 / 255,
            "letterbox": False, "batch": batch,
        },
        "labels": [f"class{i}" for i in range(classes)],
        "outputs": [{"name": "logits", "shape": ["N", classes]}],
        "postprocess": {"top_k": 3},
    }
    m.update(overrides)
    return m


def write_model(
    folder: Path, *, name: str = "tiny", version: str = "1", seed: int = 0, **kw: Any
) -> tuple[Path, Path]:
    """A model and its manifest side by side in ``folder``: (onnx, manifest json)."""
    folder.mkdir(parents=True, exist_ok=True)
    onnx_path = make_classifier(folder / f"{name}-{version}.onnx", seed=seed, **kw)
    manifest = make_manifest(
        onnx_path, name=name, version=version, classes=kw.get("classes", 4),
        size=kw.get("size", 32),
    )
    mpath = folder / f"{name}-{version}.json"
    mpath.write_text(json.dumps(manifest, indent=2))
    return onnx_path, mpath
