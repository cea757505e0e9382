"""``yolo``: YOLOv5 (``[B, N, 5+C]``) and YOLOv8 (``[B, 4+C, N]``) output decoding.

Boxes are centre-x, centre-y, width, height in model-input pixels. The unit keeps candidates
whose score reaches ``conf_threshold`` (v5: objectness x class score; v8: class score), runs
class-wise NMS (boxes of different classes never suppress each other unless
``class_agnostic``), and maps the kept boxes back through the letterbox to normalized xyxy of
the original frame.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_agent.contract import tasks
from edge_agent.inference.postprocess import base

if TYPE_CHECKING:
    from edge_agent.inference.preprocess import FrameMeta


class Yolo(base.PostprocessUnit[tasks.YoloParams], task="yolo"):
    """YOLO-style box decoding with class-wise NMS."""

    def decode(self, outputs: Sequence[np.ndarray], meta: FrameMeta) -> dict[str, Any]:
        """The boxes of one frame, after the score threshold and NMS."""
        raw = outputs[0]
        if raw.ndim != 2:
            raise ValueError(f"yolo output must be 3-D ([B, ...]), got {raw.ndim + 1}-D")
        return {"detections": self._boxes(raw, meta)}

    def _boxes(self, raw: np.ndarray, meta: FrameMeta) -> list[dict[str, Any]]:
        p = self.params
        if p.layout == "v8":
            pred = raw.T  # [N, 4+C]
            cls_scores = pred[:, 4:]
        else:
            pred = raw  # [N, 5+C]
            cls_scores = pred[:, 5:] * pred[:, 4:5]
        if cls_scores.shape[1] == 0:
            return []
        cls_ids = cls_scores.argmax(axis=1)
        scores = cls_scores[np.arange(cls_scores.shape[0]), cls_ids]
        mask = scores >= p.conf_threshold
        if not mask.any():
            return []
        idx = np.nonzero(mask)[0]
        if idx.size > p.max_candidates:
            idx = idx[np.argsort(-scores[idx], kind="stable")[: p.max_candidates]]
        cxcywh = pred[idx, :4].astype(np.float64)
        boxes = np.empty_like(cxcywh)
        boxes[:, :2] = cxcywh[:, :2] - cxcywh[:, 2:] / 2
        boxes[:, 2:] = cxcywh[:, :2] + cxcywh[:, 2:] / 2
        sc = scores[idx].astype(np.float64)
        cl = cls_ids[idx]
        if p.class_agnostic:
            shifted = boxes
        else:
            # offset each class into its own region so one NMS pass never mixes classes
            span = float(np.abs(boxes).max()) * 2 + 1
            shifted = boxes + (cl.astype(np.float64) * span)[:, None]
        keep = base.nms(shifted, sc, p.iou_threshold, p.max_detections)
        norm = meta.to_normalized(boxes[keep])
        return [
            base.detection(int(cl[k]), self.label(int(cl[k])), sc[k], norm[j])
            for j, k in enumerate(keep)
        ]
