"""``classification``: softmax (optional) and top-k classes with their labels."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_agent.contract import tasks
from edge_agent.inference.postprocess import base

if TYPE_CHECKING:
    from edge_agent.inference.preprocess import FrameMeta


class Classification(base.PostprocessUnit[tasks.ClassificationParams], task="classification"):
    """Output ``[B, C]`` (or ``[B, C, 1, 1]``) scores -> ``{"classes": [{id, label, score}]}``."""

    def decode(self, outputs: Sequence[np.ndarray], meta: FrameMeta) -> dict[str, Any]:
        """The top classes of one frame, best first."""
        p = self.params
        row = np.asarray(outputs[0], dtype=np.float64).reshape(-1)
        if p.softmax:
            row = np.exp(row - row.max())
            row /= row.sum()
        k = min(p.top_k, row.size)
        top = np.argpartition(-row, k - 1)[:k] if k < row.size else np.arange(row.size)
        top = top[np.argsort(-row[top], kind="stable")]
        return {
            "classes": [
                {"id": int(i), "label": self.label(int(i)), "score": round(float(row[i]), 6)}
                for i in top
                if row[i] >= p.min_score
            ]
        }
