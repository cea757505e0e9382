"""Turn a camera frame (BGR uint8, any size) into the tensor a model's manifest asks for.

Resize or letterbox, colour order, normalization and layout all come from the manifest's
``input`` section, and the geometry of the transform is returned beside the tensor
(``FrameMeta``) so post-processing can map boxes back to the original frame. Kept free of any
ONNX Runtime state so it runs in any worker thread, concurrently.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from edge_agent.contract.manifest import InputSpec
from edge_agent.errors import InputError


@dataclass(frozen=True, slots=True)
class FrameMeta:
    """Geometry of one frame's transform: ``x_in = x_orig * scale_x + pad_x`` (pixels)."""

    width: int
    height: int
    scale_x: float
    scale_y: float
    pad_x: float
    pad_y: float

    def to_normalized(self, boxes_in: np.ndarray) -> np.ndarray:
        """Map ``[N, 4]`` xyxy boxes in model-input pixels to xyxy in [0, 1] of the frame."""
        out = np.empty_like(boxes_in, dtype=np.float64)
        out[:, 0::2] = (boxes_in[:, 0::2] - self.pad_x) / (self.scale_x * self.width)
        out[:, 1::2] = (boxes_in[:, 1::2] - self.pad_y) / (self.scale_y * self.height)
        return np.clip(out, 0.0, 1.0)

    def points_to_normalized(self, pts_in: np.ndarray) -> np.ndarray:
        """Map ``[..., 2]`` (x, y) points in model-input pixels to [0, 1] of the frame."""
        out = np.empty_like(pts_in, dtype=np.float64)
        out[..., 0] = (pts_in[..., 0] - self.pad_x) / (self.scale_x * self.width)
        out[..., 1] = (pts_in[..., 1] - self.pad_y) / (self.scale_y * self.height)
        return np.clip(out, 0.0, 1.0)


class Preprocessor:
    """The manifest's input transform, with its constants computed once."""

    def __init__(self, spec: InputSpec) -> None:
        self.spec = spec
        std = np.asarray(spec.std, dtype=np.float32)
        # (p * scale - mean) / std  ==  p * a - b, one multiply-add per value
        self._a = (np.float32(spec.scale) / std).astype(np.float32)
        self._b = (np.asarray(spec.mean, dtype=np.float32) / std).astype(np.float32)

    def __call__(self, frame: np.ndarray) -> tuple[np.ndarray, FrameMeta]:
        """Return a ``[1, ...]`` float32 tensor for ``frame`` and its ``FrameMeta``."""
        frame = _as_bgr(frame)
        h, w = frame.shape[:2]
        spec = self.spec
        tw, th = spec.width, spec.height
        if spec.letterbox:
            r = min(tw / w, th / h)
            nw, nh = max(1, round(w * r)), max(1, round(h * r))
            resized = frame if (nw, nh) == (w, h) else cv2.resize(
                frame, (nw, nh), interpolation=cv2.INTER_LINEAR
            )
            left, top = (tw - nw) // 2, (th - nh) // 2
            img = cv2.copyMakeBorder(
                resized, top, th - nh - top, left, tw - nw - left,
                cv2.BORDER_CONSTANT, value=(spec.pad_value,) * 3,
            )
            meta = FrameMeta(w, h, nw / w, nh / h, float(left), float(top))
        else:
            img = frame if (tw, th) == (w, h) else cv2.resize(
                frame, (tw, th), interpolation=cv2.INTER_LINEAR
            )
            meta = FrameMeta(w, h, tw / w, th / h, 0.0, 0.0)
        if spec.color == "RGB":
            img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        if spec.layout == "NCHW":
            # Transpose the uint8 image first (a quarter of the bytes), then scale in place on a
            # contiguous CHW array: ~5x faster than normalizing HWC floats and transposing after.
            x = np.ascontiguousarray(img.transpose(2, 0, 1)).astype(np.float32)
            x *= self._a.reshape(3, 1, 1)
            x -= self._b.reshape(3, 1, 1)
        else:
            x = img.astype(np.float32)
            x *= self._a
            x -= self._b
        return x[np.newaxis], meta


def _as_bgr(frame: np.ndarray) -> np.ndarray:
    if not isinstance(frame, np.ndarray) or frame.size == 0:
        raise InputError("frame is empty or not an image array")
    if frame.dtype != np.uint8:
        raise InputError(f"frame must be uint8, got {frame.dtype}")
    if frame.ndim == 2:
        return cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    if frame.ndim == 3 and frame.shape[2] == 3:
        return frame
    if frame.ndim == 3 and frame.shape[2] == 4:
        return cv2.cvtColor(frame, cv2.COLOR_BGRA2BGR)
    if frame.ndim == 3 and frame.shape[2] == 1:
        return cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    raise InputError(f"frame must be HxW or HxWx3/4, got shape {frame.shape}")
