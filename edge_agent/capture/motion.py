"""Motion gating: decide in the capture thread whether a frame is worth running the model on.

A fixed camera over a loading dock sees nothing move most of the time, and on a CPU edge box
the model is the whole cost of a frame. ``MotionDetector`` is the cheap check in front of it:
the frame is shrunk to a small grayscale copy (``width`` pixels wide, bilinear, then a 5x5
blur against noise and compression flicker), compared with a running average of past copies
(the background), and the pixels that changed by more than ``threshold`` gray levels are
dilated (joining an object's edges) and counted; masked regions are blanked before the blur,
so what moves there neither counts nor bleeds across the mask's edge. Motion is a
changed area of at least ``min_area`` of the unmasked frame. One check costs about 0.1 ms at
any camera resolution (the shrink reads only the pixels it samples).

The background follows the scene with weight ``background_alpha`` per frame, and faster
(``SETTLE_ALPHA``) where a pixel has not changed since the previous frame, so an object that
stops fades into it within 2-3 frames and stops the model, while an object creeping a pixel a
frame still builds up a difference; a slow change (daylight) never counts. The first frame,
and the first after the frame size changed, has nothing to compare with and counts as motion.

``MotionGate`` adds the keep-alive: a frame is let through at least every ``keepalive_s``
seconds even without motion, so a still object is re-checked and re-reported. The caller
supplies the clock (seconds of video for a file, the wall clock for a live camera), so a replay
gates frame for frame like the camera did.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from edge_agent.config.motion import MotionSettings

#: A pixel whose blurred gray level moved by at most this since the previous frame has settled.
SETTLED_LEVEL = 3
#: Background weight of the new frame where a pixel has settled: an object that stopped is
#: taken into the background within 2-3 frames instead of ``1 / background_alpha``, while a
#: slow mover (whose pixels keep changing a little every frame) is still caught by the slow
#: average.
SETTLE_ALPHA = 0.5

#: Why a frame was let through, or ``still`` when it was not.
Decision = Literal["motion", "keepalive", "still"]


class MotionDetector:
    """Frame differencing against a running background average on a small grayscale copy."""

    def __init__(self, settings: MotionSettings) -> None:
        import cv2  # noqa: PLC0415 - OpenCV is heavy; only capture threads with gating need it

        self._cv2: Any = cv2
        self.settings = settings
        self._bg: np.ndarray | None = None  # float32 background, (h, w)
        self._prev: np.ndarray | None = None  # the previous small copy, uint8
        self._shape: tuple[int, int] | None = None  # the full frame's (h, w) it was made for
        self._keep: np.ndarray | None = None  # uint8, 1 where motion counts (masks are 0)
        self._min_pixels = 1
        self._area_pixels = 1
        self._kernel = np.ones((3, 3), np.uint8)
        #: Changed fraction of the unmasked frame at the last check (for tests and tuning).
        self.last_area = 0.0

    def _reset(self, shape: tuple[int, int]) -> None:
        s = self.settings
        h, w = shape
        sw = min(s.width, w)
        sh = max(1, round(h * sw / w))
        keep = np.ones((sh, sw), np.uint8)
        for poly in s.masks:
            pts = np.array([[round(x * (sw - 1)), round(y * (sh - 1))] for x, y in poly],
                           np.int32)
            self._cv2.fillPoly(keep, [pts], 0)
        self._keep = keep
        self._area_pixels = max(1, int(keep.sum()))
        self._min_pixels = max(1, round(s.min_area * self._area_pixels))
        self._shape = shape
        self._bg = None

    def _small(self, img: np.ndarray) -> np.ndarray:
        cv2 = self._cv2
        assert self._keep is not None
        sh, sw = self._keep.shape
        small = cv2.resize(img, (sw, sh), interpolation=cv2.INTER_LINEAR)
        if small.ndim == 3:
            small = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY)
        if self.settings.masks:
            # masked pixels are painted black before the blur, so they are the same in every
            # frame: what moves there can neither count nor bleed across the mask's edge
            small = cv2.multiply(small, self._keep)
        return np.asarray(cv2.GaussianBlur(small, (5, 5), 0))

    def detect(self, img: np.ndarray) -> bool:
        """Whether ``img`` (BGR or grayscale uint8) differs from the background; updates it."""
        cv2 = self._cv2
        shape = (int(img.shape[0]), int(img.shape[1]))
        if shape != self._shape:
            self._reset(shape)
        gray = self._small(img)
        bg = self._bg
        prev = self._prev
        self._prev = gray
        if bg is None or prev is None:
            self._bg = gray.astype(np.float32)
            self.last_area = 1.0
            return True
        diff = cv2.absdiff(gray, cv2.convertScaleAbs(bg))
        _, changed = cv2.threshold(diff, self.settings.threshold, 1, cv2.THRESH_BINARY)
        if self.settings.dilate:
            changed = cv2.dilate(changed, self._kernel, iterations=self.settings.dilate)
        n = int(cv2.countNonZero(changed))
        cv2.accumulateWeighted(gray, bg, self.settings.background_alpha)
        settled = cv2.compare(cv2.absdiff(gray, prev), SETTLED_LEVEL, cv2.CMP_LE)
        cv2.accumulateWeighted(gray, bg, SETTLE_ALPHA, mask=settled)
        self.last_area = n / self._area_pixels
        return n >= self._min_pixels


class MotionGate:
    """The detector plus the keep-alive: which frames of one camera go to inference.

    Used by one capture thread; its counters are plain ints read by others (atomic stores).
    """

    def __init__(self, settings: MotionSettings) -> None:
        self.settings = settings
        self.detector = MotionDetector(settings)
        self._last_through: float | None = None
        #: Frames let through because something moved.
        self.motion = 0
        #: Frames let through by the keep-alive (no motion for ``keepalive_s``).
        self.keepalives = 0
        #: Frames held back: no motion, keep-alive not due.
        self.still = 0

    def check(self, img: np.ndarray, now: float) -> Decision:
        """Decide for the frame read at ``now`` (seconds on the caller's clock)."""
        moved = self.detector.detect(img)  # always: the background follows every frame
        last = self._last_through
        if moved:
            self.motion += 1
            decision: Decision = "motion"
        elif last is None or now - last >= self.settings.keepalive_s - 1e-9 or now < last:
            # (1e-9: frame times are index / fps, so 2 s of 30 fps video is 60 frames, always)
            # ``now < last``: the clock went back (a file looped): re-check at once
            self.keepalives += 1
            decision = "keepalive"
        else:
            self.still += 1
            return "still"
        self._last_through = now
        return decision
