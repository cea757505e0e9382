"""A generated clip for motion gating: a still scene in which objects start and stop on a script.

The background is a frame of the sample video ``bikes.mp4`` (a real street scene, 640x272);
three textured objects (crops of the sample photos) rest on it and, one at a time, move for a
scripted number of frames and stop again, so the scene is still for most of the clip. A small
"sign" in the top-right corner blinks all the time: the motion a mask is for (a screen, a
flashing light). Every frame gets fresh sensor noise, and the clip is encoded as MPEG-4 Part 2,
so the detector sees compression flicker too, as it would from a camera.

``MotionClip.moving`` says, per frame, which objects moved since the previous frame (the
script the gate is judged against); ``starts`` are the frames where an object starts moving.
Used by ``tests/agent/capture/test_motion.py`` and ``bench/motion.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[3]
SAMPLES = ROOT / "models" / "out" / "samples"

#: The blinking sign's box as frame fractions (x0, y0, x1, y1): masked in the gate's config.
SIGN = (0.88, 0.04, 0.97, 0.16)
#: The mask that covers it, as ``motion.masks`` takes it (a little larger than the sign).
SIGN_MASK = [[0.86, 0.02], [0.99, 0.02], [0.99, 0.18], [0.86, 0.18]]


@dataclass(frozen=True)
class Move:
    """Object ``obj`` moves by ``(dx, dy)`` pixels per frame during frames [start, end)."""

    obj: int
    start: int
    end: int
    dx: int
    dy: int


@dataclass
class MotionClip:
    """A written clip and its script."""

    path: Path
    frames: int
    fps: float
    width: int
    height: int
    moves: list[Move]

    @property
    def starts(self) -> list[int]:
        """Frames where an object starts to move (each differs from the frame before it)."""
        return sorted({m.start for m in self.moves})

    def moving(self, frame: int) -> bool:
        """Whether any object moved between ``frame - 1`` and ``frame``."""
        return any(m.start <= frame < m.end for m in self.moves)

    @property
    def still_fraction(self) -> float:
        """Fraction of frames in which nothing moved."""
        return sum(not self.moving(i) for i in range(self.frames)) / self.frames


def default_script(frames: int, *, slot: int = 75, moving: int = 15) -> list[Move]:
    """One object moves for ``moving`` frames in every ``slot`` frames (still 80 % by default),
    the three in turn, each back where it came from on its next turn."""
    speeds = [(5, 0), (-4, 2), (3, -3)]
    out = []
    for k in range(frames // slot):
        obj = k % 3
        sign = 1 if (k // 3) % 2 == 0 else -1
        dx, dy = speeds[obj]
        start = k * slot + (slot - moving) // 2
        out.append(Move(obj=obj, start=start, end=start + moving, dx=sign * dx, dy=sign * dy))
    return out


def _objects() -> list[np.ndarray]:
    """Three textured patches cut from the sample photos."""
    out = []
    for name, size in (("chelsea.png", (72, 60)), ("coffee.png", (64, 64)),
                       ("astronaut.png", (56, 72))):
        img = cv2.imread(str(SAMPLES / name))
        assert img is not None, f"missing sample {name}"
        h, w = img.shape[:2]
        crop = img[h // 4 : h * 3 // 4, w // 4 : w * 3 // 4]
        out.append(cv2.resize(crop, size, interpolation=cv2.INTER_AREA))
    return out


def _background() -> np.ndarray:
    cap = cv2.VideoCapture(str(SAMPLES / "bikes.mp4"))
    ok, frame = cap.read()
    cap.release()
    assert ok, "cannot read bikes.mp4"
    return np.asarray(frame)


def write_clip(path: Path, frames: int = 300, fps: float = 30.0, *, seed: int = 7,
               moves: list[Move] | None = None) -> MotionClip:
    """Render and encode the clip at ``path`` (mp4v)."""
    bg = _background()
    h, w = bg.shape[:2]
    objs = _objects()
    moves = default_script(frames) if moves is None else moves
    homes = [(80, 150), (300, 60), (470, 170)]
    rng = np.random.default_rng(seed)
    wr = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), fps, (w, h))
    assert wr.isOpened(), "OpenCV cannot write mp4v here"
    sx0, sy0, sx1, sy1 = (round(SIGN[0] * w), round(SIGN[1] * h), round(SIGN[2] * w),
                          round(SIGN[3] * h))
    for i in range(frames):
        img = bg.copy()
        for k, obj in enumerate(objs):
            x, y = homes[k]
            for m in moves:
                if m.obj == k and i >= m.start:
                    steps = min(i, m.end - 1) - m.start + 1
                    x, y = x + m.dx * steps, y + m.dy * steps
            oh, ow = obj.shape[:2]
            x = int(np.clip(x, 0, w - ow))
            y = int(np.clip(y, 0, h - oh))
            img[y : y + oh, x : x + ow] = obj
        img[sy0:sy1, sx0:sx1] = (0, 0, 255) if (i // 5) % 2 else (255, 255, 255)
        noise = rng.normal(0.0, 2.0, img.shape)
        wr.write(np.clip(img.astype(np.float32) + noise, 0, 255).astype(np.uint8))
    wr.release()
    return MotionClip(path, frames, fps, w, h, moves)
