"""A corpus of model versions at the edges of the contract: real ONNX bytes and manifest bytes.

Each ``Case`` builds (ONNX bytes, manifest bytes) and says what the contract should answer:
``None`` (served) or the ``Reason`` of the refusal. The graphs are small but real (built with
the ``onnx`` helper API, checked by ``onnx.checker`` where they are valid): the input is cast
to float, averaged per batch item and broadcast against a constant into every declared output,
so outputs keep the input's batch axis and run in onnxruntime for the agent's warm-up.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge_agent.contract.rejection import Reason

Shape = Sequence[int | str]
FLOAT = TensorProto.FLOAT

#: A classifier's default: three classes for three labels.
LABELS = ["red", "green", "blue"]


def graph_bytes(
    inputs: Sequence[tuple[str, int, Shape]] = (("images", FLOAT, ["N", 3, 32, 32]),),
    outputs: Sequence[tuple[str, Shape]] = (("logits", ["N", 3]),),
    *,
    fill: float = 0.5,
    check: bool = True,
) -> bytes:
    """A model with these inputs (name, element type, shape) and outputs (name, shape)."""
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    pooled: list[str] = []
    for name, _, shape in inputs:
        nodes += [
            helper.make_node("Cast", [name], [f"{name}_f"], to=FLOAT),
            helper.make_node("ReduceMean", [f"{name}_f"], [f"{name}_m"],
                             axes=list(range(1, len(shape))), keepdims=0),
        ]
        pooled.append(f"{name}_m")
    if len(pooled) > 1:
        nodes.append(helper.make_node("Sum", pooled, ["pooled"]))
    else:
        nodes.append(helper.make_node("Identity", pooled, ["pooled"]))
    for name, shape in outputs:
        rank = len(shape)
        tail = [d if isinstance(d, int) else 2 for d in shape[1:]]
        inits += [
            numpy_helper.from_array(np.asarray([-1] + [1] * (rank - 1), np.int64), f"{name}_rs"),
            numpy_helper.from_array(np.full([1, *tail], fill, np.float32), f"{name}_c"),
        ]
        nodes += [
            helper.make_node("Reshape", ["pooled", f"{name}_rs"], [f"{name}_p"]),
            helper.make_node("Mul", [f"{name}_p", f"{name}_c"], [name]),
        ]
    graph = helper.make_graph(
        nodes, "corpus",
        [helper.make_tensor_value_info(n, t, list(s)) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, FLOAT, list(s)) for n, s in outputs],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if check:
        onnx.checker.check_model(model)
    return model.SerializeToString()


def manifest(name: str, onnx_bytes: bytes, /, **over: Any) -> dict[str, Any]:
    """A classifier manifest for ``graph_bytes()``'s default model, with fields replaced."""
    m: dict[str, Any] = {
        "name": name, "version": "1", "task": "classification", "file": "model.onnx",
        "sha256": hashlib.sha256(onnx_bytes).hexdigest(),
        "input": {"name": "images", "width": 32, "height": 32, "layout": "NCHW",
                  "batch": "dynamic"},
        "labels": list(LABELS),
        "outputs": [{"name": "logits", "shape": ["N", 3]}],
        "postprocess": {"top_k": 2},
    }
    m.update(over)
    return m


@dataclass(frozen=True)
class Case:
    """One corpus entry: its id, what the contract answers, and how to build its bytes."""

    id: str
    expect: Reason | None
    #: ``(name) -> (onnx bytes, manifest JSON object or raw bytes)``.
    build: Callable[[str], tuple[bytes, dict[str, Any] | bytes]] = field(repr=False)

    @property
    def name(self) -> str:
        """The model name the case is pushed under (a valid protocol name)."""
        return "c-" + self.id.replace("_", "-")

    def files(self) -> tuple[bytes, bytes]:
        """(ONNX bytes, manifest bytes), as pushed to the hub and loaded by the agent."""
        data, man = self.build(self.name)
        raw = man if isinstance(man, bytes) else json.dumps(man, indent=1).encode()
        return data, raw


def _input(**over: Any) -> dict[str, Any]:
    base = {"name": "images", "width": 32, "height": 32, "layout": "NCHW", "batch": "dynamic"}
    base.update(over)
    return {k: v for k, v in base.items() if v is not _DROP}


_DROP = object()


def _classifier(input_shape: Shape = ("N", 3, 32, 32), elem: int = FLOAT, **over: Any) -> (
    Callable[[str], tuple[bytes, dict[str, Any]]]
):
    """A builder: the default classifier graph with another input, and manifest changes."""
    def build(name: str) -> tuple[bytes, dict[str, Any]]:
        out_shape: Shape = [input_shape[0], 3]
        data = graph_bytes((("images", elem, list(input_shape)),), (("logits", out_shape),))
        return data, manifest(name, data, **over)
    return build


def _outputs(graph_outputs: Sequence[tuple[str, Shape]], /, *, fill: float = 0.5,
             **over: Any) -> (
    Callable[[str], tuple[bytes, dict[str, Any]]]
):
    """A builder: the default input, these graph outputs, and manifest changes."""
    def build(name: str) -> tuple[bytes, dict[str, Any]]:
        data = graph_bytes(outputs=graph_outputs, fill=fill)
        man_outputs = [{"name": n, "shape": list(s)} for n, s in graph_outputs]
        return data, manifest(name, data, **{"outputs": man_outputs, **over})
    return build


def _raw(data: bytes, **over: Any) -> Callable[[str], tuple[bytes, dict[str, Any]]]:
    """A builder: these model bytes, with a manifest that carries their digest."""
    def build(name: str) -> tuple[bytes, dict[str, Any]]:
        return data, manifest(name, data, **over)
    return build


def _bad_manifest(raw: bytes) -> Callable[[str], tuple[bytes, bytes]]:
    def build(name: str) -> tuple[bytes, bytes]:
        return graph_bytes(), raw
    return build


def _two_inputs(name: str) -> tuple[bytes, dict[str, Any]]:
    data = graph_bytes((("images", FLOAT, ["N", 3, 32, 32]), ("extra", FLOAT, ["N", 4])))
    return data, manifest(name, data)


def _truncated(name: str) -> tuple[bytes, dict[str, Any]]:
    data = graph_bytes()
    data = data[: len(data) // 2]
    return data, manifest(name, data)


_YOLO = {"task": "yolo", "postprocess": {"layout": "v8"}}
_CENTERFACE_OUT = [("heat", ["N", 1, 8, 8]), ("scale", ["N", 2, 8, 8]),
                   ("offset", ["N", 2, 8, 8]), ("lms", ["N", 10, 8, 8])]

CASES: tuple[Case, ...] = (
    # --- served
    Case("ok", None, _classifier()),
    Case("missing_layout", None, _classifier(input=_input(layout=_DROP))),
    Case("nhwc", None, _classifier(("N", 32, 32, 3), input=_input(layout="NHWC"))),
    Case("side_8192", None, _classifier(("N", 3, 1, 8192), input=_input(width=8192, height=1))),
    Case("height_8192", None,
         _classifier(("N", 3, 8192, 1), input=_input(width=1, height=8192))),
    Case("symbolic_sides", None,
         _classifier(("N", 3, "h", "w"), input=_input(width=64, height=48))),
    Case("fixed_batch_both", None, _classifier((2, 3, 32, 32), input=_input(batch=2),
                                                outputs=[{"name": "logits", "shape": [2, 3]}])),
    Case("no_labels", None, _classifier(labels=[])),
    Case("classifier_nc11", None, _outputs([("logits", ["N", 3, 1, 1])])),
    Case("symbolic_class_dim", None, _outputs([("logits", ["N", 3])],
                                              outputs=[{"name": "logits", "shape": ["N", "C"]}])),
    Case("yolo_v8", None, _outputs([("output0", ["N", 7, 50])], **_YOLO)),
    Case("centerface", None, _outputs(_CENTERFACE_OUT, task="centerface", labels=["face"],
                                      postprocess={"threshold": 0.6})),
    Case("nan_outputs", None, _outputs([("logits", ["N", 3])], fill=math.nan)),
    Case("defaults_only", None, _classifier(postprocess={}, description="d", license="MIT")),
    # --- refused by the manifest alone
    Case("side_8193", Reason.INVALID_FIELD,
         _classifier(("N", 3, 1, 8193), input=_input(width=8193, height=1))),
    Case("side_16384", Reason.INVALID_FIELD,
         _classifier(("N", 3, 1, 16384), input=_input(width=16384, height=1))),
    Case("height_16384", Reason.INVALID_FIELD,
         _classifier(("N", 3, 16384, 1), input=_input(width=1, height=16384))),
    Case("side_zero", Reason.INVALID_FIELD, _classifier(input=_input(width=0))),
    Case("unknown_layout", Reason.INVALID_FIELD, _classifier(input=_input(layout="CHWN"))),
    Case("unknown_task", Reason.UNKNOWN_TASK, _classifier(task="segmentation")),
    Case("postprocess_out_of_range", Reason.POSTPROCESS_PARAMS,
         _classifier(postprocess={"top_k": 0})),
    Case("postprocess_unknown_key", Reason.POSTPROCESS_PARAMS,
         _classifier(postprocess={"topk": 3})),
    Case("postprocess_nan", Reason.POSTPROCESS_PARAMS,
         _outputs([("output0", ["N", 7, 50])], task="yolo",
                  postprocess={"conf_threshold": math.nan})),
    Case("yolo_unknown_layout", Reason.POSTPROCESS_PARAMS,
         _outputs([("output0", ["N", 7, 50])], task="yolo", postprocess={"layout": "v9"})),
    Case("labels_vs_classes", Reason.TASK_OUTPUTS, _classifier(labels=["a", "b", "c", "d"])),
    Case("yolo_rank_2", Reason.TASK_OUTPUTS, _outputs([("output0", ["N", 7])], **_YOLO)),
    Case("centerface_one_output", Reason.TASK_OUTPUTS,
         _outputs(_CENTERFACE_OUT[:1], task="centerface", postprocess={})),
    Case("nan_mean", Reason.INVALID_FIELD, _classifier(input=_input(mean=[math.nan, 0, 0]))),
    Case("infinite_scale", Reason.INVALID_FIELD, _classifier(input=_input(scale=math.inf))),
    Case("zero_std", Reason.INVALID_FIELD, _classifier(input=_input(std=[1, 0, 1]))),
    Case("bad_sha256", Reason.INVALID_FIELD, _classifier(sha256="xyz")),
    Case("file_traversal", Reason.INVALID_FIELD, _classifier(file="../../etc/passwd")),
    Case("file_reserved", Reason.INVALID_FIELD, _classifier(file="manifest.json")),
    Case("bad_name", Reason.INVALID_FIELD, _classifier(name="Bad Name")),
    Case("unknown_key", Reason.UNKNOWN_KEY, _classifier(colour="RGB")),
    Case("missing_outputs", Reason.MISSING_FIELD,
         lambda n: (graph_bytes(), {k: v for k, v in manifest(n, graph_bytes()).items()
                                    if k != "outputs"})),
    Case("not_json", Reason.MANIFEST_NOT_JSON, _bad_manifest(b"{not json")),
    Case("not_utf8", Reason.MANIFEST_NOT_JSON, _bad_manifest(b'{"name": "\xff"}')),
    Case("not_an_object", Reason.MANIFEST_NOT_OBJECT, _bad_manifest(b"[1, 2]")),
    # --- refused by the graph
    Case("not_onnx", Reason.NOT_ONNX, _raw(b"this is not a model\n" * 50)),
    Case("truncated", Reason.NOT_ONNX, _truncated),
    Case("input_int8", Reason.INPUT_TYPE, _classifier(elem=TensorProto.INT8)),
    Case("input_uint8", Reason.INPUT_TYPE, _classifier(elem=TensorProto.UINT8)),
    Case("input_float16", Reason.INPUT_TYPE, _classifier(elem=TensorProto.FLOAT16)),
    Case("input_double", Reason.INPUT_TYPE, _classifier(elem=TensorProto.DOUBLE)),
    Case("input_name", Reason.INPUT_NAME, _classifier(input=_input(name="pixels"))),
    Case("two_inputs", Reason.INPUT_COUNT, _two_inputs),
    Case("missing_layout_nhwc_graph", Reason.INPUT_SHAPE,
         _classifier(("N", 32, 32, 3), input=_input(layout=_DROP))),
    Case("side_mismatch", Reason.INPUT_SHAPE, _classifier(input=_input(width=64))),
    Case("one_channel", Reason.INPUT_SHAPE, _classifier(("N", 1, 32, 32))),
    Case("input_rank_3", Reason.INPUT_SHAPE, _classifier(("N", 32, 32))),
    Case("fixed_batch_graph", Reason.INPUT_BATCH, _classifier((1, 3, 32, 32))),
    Case("output_missing", Reason.OUTPUT_MISSING,
         _classifier(outputs=[{"name": "probs", "shape": ["N", 3]}])),
    Case("output_shape_mismatch", Reason.OUTPUT_SHAPE,
         _outputs([("logits", ["N", 3])], labels=["a", "b", "c", "d"],
                  outputs=[{"name": "logits", "shape": ["N", 4]}])),
    Case("output_rank_mismatch", Reason.OUTPUT_SHAPE,
         _classifier(outputs=[{"name": "logits", "shape": ["N", 3, 1]}])),
    Case("labels_vs_graph_classes", Reason.TASK_OUTPUTS,
         _outputs([("logits", ["N", 3])], labels=["a", "b", "c", "d"],
                  outputs=[{"name": "logits", "shape": ["N", "C"]}])),
)
