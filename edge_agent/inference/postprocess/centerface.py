"""``centerface``: CenterFace heatmap decoding (face boxes + five landmarks) and NMS.

The model's four outputs, in the manifest's order: heatmap ``[B, 1, h, w]``, log-scale
``[B, 2, h, w]`` (height, width), centre offset ``[B, 2, h, w]`` (y, x) and landmarks
``[B, 10, h, w]`` ((y, x) x 5, relative to the box), all at 1/``stride`` of the input.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_agent.contract import tasks
from edge_agent.inference.postprocess import base

if TYPE_CHECKING:
    from edge_agent.inference.preprocess import FrameMeta


class CenterFace(base.PostprocessUnit[tasks.CenterFaceParams], task="centerface"):
    """Face boxes with landmarks from CenterFace's four maps."""

    def decode(self, outputs: Sequence[np.ndarray], meta: FrameMeta) -> dict[str, Any]:
        """The faces of one frame: boxes, scores and five landmarks each."""
        heat, scale, offset, lms = outputs
        return {"detections": self._faces(heat[0], scale, offset, lms, meta)}

    def _faces(
        self, heat: np.ndarray, scale: np.ndarray, offset: np.ndarray, lms: np.ndarray,
        meta: FrameMeta,
    ) -> list[dict[str, Any]]:
        p = self.params
        ys, xs = np.nonzero(heat > p.threshold)
        if ys.size == 0:
            return []
        s = p.stride
        in_h, in_w = heat.shape[0] * s, heat.shape[1] * s
        bh = np.exp(scale[0, ys, xs].astype(np.float64)) * s
        bw = np.exp(scale[1, ys, xs].astype(np.float64)) * s
        cy = (ys + offset[0, ys, xs] + 0.5) * s
        cx = (xs + offset[1, ys, xs] + 0.5) * s
        x1 = np.clip(cx - bw / 2, 0, in_w)
        y1 = np.clip(cy - bh / 2, 0, in_h)
        boxes = np.stack([x1, y1, np.minimum(x1 + bw, in_w), np.minimum(y1 + bh, in_h)], axis=1)
        pts = np.empty((ys.size, 5, 2), dtype=np.float64)
        pts[:, :, 0] = lms[1::2, ys, xs].T * bw[:, None] + x1[:, None]
        pts[:, :, 1] = lms[0::2, ys, xs].T * bh[:, None] + y1[:, None]
        scores = heat[ys, xs].astype(np.float64)
        keep = base.nms(boxes, scores, p.iou_threshold, p.max_detections)
        norm = meta.to_normalized(boxes[keep])
        npts = meta.points_to_normalized(pts[keep])
        label = self.label(0) if self.labels else "face"
        return [
            base.detection(0, label, scores[k], norm[j], npts[j]) for j, k in enumerate(keep)
        ]
