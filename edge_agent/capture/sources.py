"""Video sources by URL: files, RTSP/HTTP streams, USB devices and a synthetic test pattern.

A camera is configured as one URL. The URL grammar is ``edge_agent.camera_urls`` (the config
runs it, so a typo is a config error with its field path); this module opens what it accepted:
``open_source`` opens a ``camera_urls.SourceSpec`` with OpenCV's FFmpeg backend for files and
network streams (with open and read timeouts, so a stalled stream ends a blocked read instead
of hanging a thread forever), the default backend (V4L2) for ``usb://N``, or a pure-numpy
generator for ``test://pattern?width=W&height=H&fps=F``. Every source is a ``Reader``: ``grab``
advances, ``retrieve`` decodes the grabbed frame, so frames a consumer skips are never
colour-converted.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edge_agent import camera_urls

#: The device node behind ``usb://N`` (Video4Linux).
USB_DEVICE = "/dev/video{}"
#: Frame rate assumed when a file does not say (0 or NaN from the container).
DEFAULT_FPS = 30.0


class CaptureError(Exception):
    """A source that could not be opened or read (temporary: the camera retries)."""


class Reader(Protocol):
    """An open source. ``grab`` advances one frame; ``retrieve`` decodes the grabbed one."""

    #: The source's own frame rate (frames per second; ``DEFAULT_FPS`` when unknown).
    fps: float

    def grab(self) -> bool:
        """Advance to the next frame; False at the end of a file or on a read failure."""
        ...

    def retrieve(self) -> np.ndarray | None:
        """The grabbed frame as BGR uint8, or None when it cannot be decoded."""
        ...

    def release(self) -> None:
        """Close the source."""
        ...


class _CvReader:
    """An OpenCV ``VideoCapture`` (FFmpeg for files and streams, the default backend for USB)."""

    def __init__(self, cap: Any, fps: float) -> None:
        self._cap = cap
        self.fps = fps

    def grab(self) -> bool:
        return bool(self._cap.grab())

    def retrieve(self) -> np.ndarray | None:
        ok, frame = self._cap.retrieve()
        return frame if ok and frame is not None and frame.size else None

    def release(self) -> None:
        self._cap.release()


class _PatternReader:
    """Synthetic frames (a moving bar over a gradient) at a fixed rate; live, never fails."""

    def __init__(self, width: int, height: int, fps: float, stop: threading.Event) -> None:
        self.fps = fps
        self._period = 1.0 / fps
        self._stop = stop
        x = np.linspace(0, 255, width, dtype=np.float32)
        y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
        base = np.empty((height, width, 3), np.uint8)
        base[..., 0] = x.astype(np.uint8)
        base[..., 1] = y.astype(np.uint8)
        base[..., 2] = 96
        self._base = base
        self._n = 0
        self._next = time.monotonic()

    def grab(self) -> bool:
        delay = self._next - time.monotonic()
        if delay > 0 and self._stop.wait(delay):
            return False
        # a consumer far behind does not get a burst of catch-up frames, like a real camera
        self._next = max(self._next + self._period, time.monotonic() - self._period)
        self._n += 1
        return True

    def retrieve(self) -> np.ndarray | None:
        img = self._base.copy()
        w = img.shape[1]
        bar = max(4, w // 16)
        x = (self._n * 7) % max(1, w - bar)
        img[:, x : x + bar] = (255, 255, 255)
        return img

    def release(self) -> None:
        return None


def _usb_device(index: str) -> int:
    """The V4L2 device index of ``usb://N``, after checking that ``/dev/videoN`` exists.

    OpenCV would only say "cannot open" (and log a warning of its own to stderr); a missing
    device node is the usual cause on an edge box (camera unplugged, or the device not passed
    into the container), so it gets a message that names both.
    """
    device = Path(USB_DEVICE.format(index))
    if sys.platform.startswith("linux") and not device.exists():
        raise CaptureError(
            f"no video device {device} for usb://{index}: is the camera plugged in, and is "
            f"{device} passed into the container (a hostPath or device plugin)?")
    return int(index)


def open_source(
    spec: camera_urls.SourceSpec, *, open_timeout_s: float, read_timeout_s: float,
    stop: threading.Event,
) -> Reader:
    """Open ``spec``; raise ``CaptureError`` with a readable reason when it cannot be opened."""
    if spec.kind == "test":
        p = spec.params
        return _PatternReader(int(p["width"]), int(p["height"]), p["fps"], stop)
    import cv2  # noqa: PLC0415 - OpenCV is heavy; only the capture threads need it

    if spec.kind == "file" and not Path(spec.target).is_file():
        raise CaptureError(f"no such file: {spec.target}")
    if spec.kind == "usb":
        cap = cv2.VideoCapture(_usb_device(spec.target))
    else:
        params = [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, max(1, int(open_timeout_s * 1000)),
            cv2.CAP_PROP_READ_TIMEOUT_MSEC, max(1, int(read_timeout_s * 1000)),
        ]
        cap = cv2.VideoCapture(spec.target, cv2.CAP_FFMPEG, params)
    if not cap.isOpened():
        cap.release()
        if spec.kind == "usb":
            raise CaptureError(f"cannot open {USB_DEVICE.format(spec.target)} (usb://"
                               f"{spec.target}): busy or not a video capture device")
        raise CaptureError(f"cannot open {spec.kind} source {spec.target}")
    fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
    if not (0.0 < fps <= 1000.0):  # NaN and nonsense from some containers included
        fps = DEFAULT_FPS
    return _CvReader(cap, fps)
