"""The post-processing unit interface, its registry, and helpers shared by the units.

A unit decodes; what a task accepts (its parameter schema, the outputs it reads) is the
contract's (``edge_agent.contract.tasks``), so the hub checks a pushed manifest exactly as the
unit will read it. A unit registers by subclassing (``PostprocessUnit[Params]`` with ``task=``),
which refuses a unit whose task or schema the contract does not know.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar, cast, get_args, get_origin

import numpy as np

from edge_agent.contract import tasks
from edge_agent.errors import ModelError

if TYPE_CHECKING:
    from edge_agent.contract.manifest import ModelManifest
    from edge_agent.inference.preprocess import FrameMeta


class NonFiniteOutputError(ModelError):
    """A model produced NaN or infinite outputs: its results cannot be trusted (counted as an
    inference error, so rollout gates on the error rate see a broken model version)."""


_P = TypeVar("_P", bound=tasks.Params)


class PostprocessUnit(ABC, Generic[_P]):
    """Decodes raw outputs of one task into JSON-ready result dicts (one per frame).

    A unit names its task and the contract's parameter model for it in its class statement,
    ``class Yolo(PostprocessUnit[tasks.YoloParams], task="yolo")``, which registers it; a task
    the contract does not know, or another parameter model, is refused right there.
    """

    #: The manifest ``task`` value this unit serves (a name in ``contract.tasks.TASKS``).
    task: ClassVar[str]
    #: The contract's schema of the manifest's ``postprocess`` section for ``task``.
    params_model: ClassVar[type[tasks.Params]]

    def __init_subclass__(cls, *, task: str, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _register(cls, task)

    def __init__(self, manifest: ModelManifest) -> None:
        self.manifest = manifest
        # the manifest passed the same schema when it was parsed: this cannot fail
        self.params = cast("_P", self.params_model.model_validate(manifest.postprocess))
        self.labels = list(manifest.labels)

    def label(self, cls_id: int) -> str:
        """The label of class ``cls_id`` (its number when the manifest has no labels)."""
        return self.labels[cls_id] if 0 <= cls_id < len(self.labels) else str(cls_id)

    def __call__(
        self, outputs: Sequence[np.ndarray], metas: Sequence[FrameMeta]
    ) -> list[dict[str, Any]]:
        """One result dict per frame; ``outputs`` are batched ``[B, ...]`` arrays."""
        return [self.decode([out[b] for out in outputs], meta) for b, meta in enumerate(metas)]

    @abstractmethod
    def decode(self, outputs: Sequence[np.ndarray], meta: FrameMeta) -> dict[str, Any]:
        """One frame's result part (``{"detections": [...]}`` or ``{"classes": [...]}``) from
        its outputs, in the manifest's order, with the batch axis taken off."""


_REGISTRY: dict[str, type[PostprocessUnit[Any]]] = {}


def _register(unit: type[PostprocessUnit[Any]], task: str) -> None:
    """Make ``unit`` serve manifests whose task is ``task``: the contract's task, declared
    with the contract's parameter model (``PostprocessUnit[<that model>]``)."""
    spec = tasks.TASKS.get(task)
    declared = [get_args(b) for b in unit.__dict__.get("__orig_bases__", ())
                if get_origin(b) is PostprocessUnit]
    if spec is None or declared != [(spec.params,)]:
        raise RuntimeError(
            f"unit {unit.__name__}: task {task!r} and its params must be the contract's "
            "(edge_agent.contract.tasks)"
        )
    if task in _REGISTRY and _REGISTRY[task] is not unit:
        raise RuntimeError(f"task {task!r} is already registered")
    unit.task = task
    unit.params_model = spec.params
    _REGISTRY[task] = unit


def registered() -> dict[str, type[PostprocessUnit[Any]]]:
    """The registry (task name -> unit class)."""
    return _REGISTRY


def check_finite(outputs: Sequence[np.ndarray]) -> None:
    """Raise ``NonFiniteOutputError`` when any output holds NaN or infinity."""
    for i, out in enumerate(outputs):
        if out.dtype.kind == "f" and not np.isfinite(out).all():
            raise NonFiniteOutputError(f"model output {i} contains NaN or infinite values")


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, limit: int) -> np.ndarray:
    """Greedy non-maximum suppression on ``[N, 4]`` xyxy boxes; indices kept, best first.

    A box is suppressed when its IoU with a kept, higher-scoring box exceeds
    ``iou_threshold``. Ties keep the lower index (stable sort), so results are deterministic.
    """
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0)
    keep: list[int] = []
    while order.size and len(keep) < limit:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        iw = np.maximum(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0)
        ih = np.maximum(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0)
        inter = iw * ih
        union = areas[i] + areas[rest] - inter
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def detection(
    cls_id: int, label: str, score: float, box: Sequence[float],
    landmarks: Sequence[Sequence[float]] | None = None,
) -> dict[str, Any]:
    """One detection as plain JSON types (``protocol.Detection`` fields), rounded to 1e-6."""
    d: dict[str, Any] = {
        "cls": int(cls_id),
        "label": label,
        "score": round(float(score), 6),
        "box": [round(float(v), 6) for v in box],
    }
    if landmarks is not None:
        d["landmarks"] = [[round(float(x), 6), round(float(y), 6)] for x, y in landmarks]
    return d
