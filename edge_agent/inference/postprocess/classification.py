"""``classification``: softmax (optional) and top-k classes with their labels."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_agent.contract import tasks
from edge_agent.inference.postprocess.base import PostprocessUnit, register

if TYPE_CHECKING:
    from edge_agent.inference.preprocess import FrameMeta


@register
class Classification(PostprocessUnit):
    """Output ``[B, C]`` (or ``[B, C, 1, 1]``) scores -> ``{"classes": [{id, label, score}]}``."""

    task = "classification"
    params_model = tasks.ClassificationParams

    def __call__(
        self, outputs: Sequence[np.ndarray], metas: Sequence[FrameMeta]
    ) -> list[dict[str, Any]]:
        p: tasks.ClassificationParams = self.params
        scores = np.asarray(outputs[0], dtype=np.float64).reshape(len(metas), -1)
        if p.softmax:
            scores = np.exp(scores - scores.max(axis=1, keepdims=True))
            scores /= scores.sum(axis=1, keepdims=True)
        k = min(p.top_k, scores.shape[1])
        results: list[dict[str, Any]] = []
        for row in scores:
            top = np.argpartition(-row, k - 1)[:k] if k < row.size else np.arange(row.size)
            top = top[np.argsort(-row[top], kind="stable")]
            results.append({
                "classes": [
                    {"id": int(i), "label": self.label(int(i)), "score": round(float(row[i]), 6)}
                    for i in top
                    if row[i] >= p.min_score
                ]
            })
        return results
