"""The model tasks the agent serves, and what each one needs from a manifest and its graph.

A manifest's ``task`` picks a post-processing unit in the agent
(``edge_agent.inference.postprocess``); this module says, for the hub and the agent alike,
which tasks exist, which ``postprocess`` parameters each accepts (pydantic models, unknown keys
rejected, NaN refused) and which outputs it reads. The units take their parameter models from
here, so the schema the hub checks at push is the schema the unit decodes with.

Adding a task: a ``Params`` model and a ``Task`` entry here, then a unit with the same name in
``edge_agent/inference/postprocess/`` (a test checks that every task has one).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_agent.contract.rejection import Reason, Rejection


class Params(BaseModel):
    """Base of every task's parameter model: unknown keys, NaN and infinity are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ClassificationParams(Params):
    """``classification``: softmax (optional) and the top-k classes."""

    #: How many classes to report, best first.
    top_k: int = Field(5, ge=1, le=1000)
    #: Apply softmax (the model outputs logits). False when it outputs probabilities already.
    softmax: bool = True
    #: Classes scoring below this are not reported.
    min_score: float = Field(0.0, ge=0.0, le=1.0)


class YoloParams(Params):
    """``yolo``: YOLOv5/YOLOv8 box decoding and class-wise NMS."""

    #: ``v8``: ``[B, 4+C, N]``, no objectness; ``v5``: ``[B, N, 5+C]`` with objectness.
    layout: Literal["v5", "v8"] = "v8"
    #: Minimum score kept. Default 0.25 (the Ultralytics default for prediction).
    conf_threshold: float = Field(0.25, ge=0.0, le=1.0)
    #: IoU above which a lower-scoring box of the same class is suppressed. Default 0.45.
    iou_threshold: float = Field(0.45, ge=0.0, le=1.0)
    #: Detections reported per frame at most, best first.
    max_detections: int = Field(300, ge=1, le=10_000)
    #: Candidates entering NMS at most (best first): bounds NMS time on noisy frames.
    max_candidates: int = Field(10_000, ge=1)
    #: Suppress overlapping boxes across classes too.
    class_agnostic: bool = False


class CenterFaceParams(Params):
    """``centerface``: heatmap decoding of face boxes and landmarks, then NMS."""

    #: Minimum heatmap value for a face. Default 0.5 (CenterFace's own default).
    threshold: float = Field(0.5, ge=0.0, le=1.0)
    #: IoU above which a weaker overlapping face is suppressed. Default 0.3.
    iou_threshold: float = Field(0.3, ge=0.0, le=1.0)
    max_detections: int = Field(100, ge=1, le=10_000)
    #: Output stride of the heatmap relative to the input. CenterFace: 4.
    stride: int = Field(4, ge=1)


@dataclass(frozen=True)
class Task:
    """One task: its parameter schema and the outputs its unit reads."""

    name: str
    params: type[Params]
    #: Allowed rank of each output, in the manifest's order (so also how many outputs).
    #: ``None``: any rank with a batch axis (two or more).
    output_ranks: tuple[int | None, ...]
    #: The class count (all non-batch dims of the one output) must equal the number of labels
    #: when both are known.
    classes_match_labels: bool = False

    @property
    def num_outputs(self) -> int:
        """How many graph outputs the task reads."""
        return len(self.output_ranks)


#: Every task, by name.
TASKS: Mapping[str, Task] = {
    t.name: t
    for t in (
        # [B, C] scores, or any [B, ...] whose non-batch dims are the classes
        Task("classification", ClassificationParams, (None,), classes_match_labels=True),
        # [B, 4+C, N] (v8) or [B, N, 5+C] (v5)
        Task("yolo", YoloParams, (3,)),
        # heatmap, scale, offset, landmarks: [B, k, h, w] each
        Task("centerface", CenterFaceParams, (4, 4, 4, 4)),
    )
}


def names() -> tuple[str, ...]:
    """The task names, sorted."""
    return tuple(sorted(TASKS))


def get(name: str) -> Task:
    """The task called ``name``; ``Rejection(UNKNOWN_TASK)`` when there is none."""
    task = TASKS.get(name)
    if task is None:
        raise Rejection(
            Reason.UNKNOWN_TASK, f"unknown task {name!r}; known tasks: {', '.join(names())}"
        )
    return task


def check_params(task: Task, params: Mapping[str, object]) -> Params:
    """The validated ``postprocess`` section; ``Rejection(POSTPROCESS_PARAMS)`` naming the key."""
    try:
        return task.params.model_validate(dict(params))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        msg = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
        raise Rejection(Reason.POSTPROCESS_PARAMS, f"postprocess.{where}: {msg}") from None


def check_outputs(
    task: Task, outputs: Sequence[tuple[str, Sequence[int | str | None]]], labels: Sequence[str]
) -> None:
    """Raise ``Rejection(TASK_OUTPUTS)`` unless ``(name, shape)`` outputs suit ``task``.

    Run on the manifest's declared shapes and again on the graph's, which may fix a dimension
    the manifest leaves symbolic. A dimension is fixed when it is an int.
    """
    if len(outputs) != task.num_outputs:
        raise Rejection(
            Reason.TASK_OUTPUTS,
            f"task {task.name!r} reads {task.num_outputs} output(s), there are {len(outputs)}",
        )
    for (name, shape), rank in zip(outputs, task.output_ranks, strict=True):
        if (rank is None and len(shape) < 2) or (rank is not None and len(shape) != rank):
            want = "2 or more" if rank is None else str(rank)
            raise Rejection(
                Reason.TASK_OUTPUTS,
                f"task {task.name!r} needs output {name!r} of rank {want}, its shape is "
                f"{list(shape)}",
            )
    if task.classes_match_labels and labels:
        name, shape = outputs[0]
        tail = list(shape[1:])
        if all(isinstance(d, int) for d in tail):
            classes = math.prod(d for d in tail if isinstance(d, int))
            if classes != len(labels):
                raise Rejection(
                    Reason.TASK_OUTPUTS,
                    f"{len(labels)} labels for a classifier with {classes} classes "
                    f"(output {name!r} has shape {list(shape)})",
                )
