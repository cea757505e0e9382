"""A track's best frame, kept as a crop while it is open and sent as a JPEG when it ends (and,
where the camera asks for it, the frame that confirmed it, at once).

Why here: the tracker knows when a track's best score improves and when the track ends; the
frame is in hand only at the first moment (the pipeline hands it with the result, under
``contract.snapshots.FRAME_KEY``, for cameras with ``snapshot.enabled``). So ``Snapshots``
copies the region (the box plus ``padding`` on each side, clipped to the frame) each time a
track's best improves, at most ``KEEP_MAX_SIDE`` pixels on its longer side so an open track
holds at most about a megabyte, and encodes it once, when the track ends (``take``): at
``quality`` first, then lower qualities, then scaled down, until the JPEG fits ``max_bytes``.
With ``at: [new, ...]`` the crop kept at the track's confirmation is also encoded then
(``first``): the ``new`` event's picture, before the best is known.
A crop that cannot fit even small is dropped, counted and logged. Encoding runs on the event
loop thread: a few milliseconds for a crop of this size, once per track.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog

from edge_agent.config.tracking import SnapshotSettings
from edge_agent.contract import snapshots as wire

log = structlog.get_logger(__name__)

#: Longer side, in pixels, of a kept crop (larger regions are scaled down when kept).
KEEP_MAX_SIDE = 640
#: Qualities tried after the configured one when the JPEG is too large (those below it).
FALLBACK_QUALITIES = (70, 55, 40, 30)
#: Scale factor per further try once the lowest quality is still too large, and the smallest
#: side in pixels worth sending.
SHRINK, MIN_SIDE = 0.7, 16


def _cv2() -> Any:
    """OpenCV, imported on first use (the agent's capture has it loaded by then)."""
    return importlib.import_module("cv2")


@dataclass(slots=True)
class _Kept:
    crop: np.ndarray
    region: tuple[float, float, float, float]
    box: tuple[float, float, float, float]
    ts: float
    score: float
    label: str


@dataclass(slots=True)
class SnapshotCounts:
    """What one camera's snapshots came to since start."""

    sent: int = 0
    bytes: int = 0
    #: Dropped, by reason: ``too_large`` (no quality or scale fitted ``max_bytes``),
    #: ``no_frame`` (the track ended before a frame of it was kept).
    dropped: dict[str, int] = field(default_factory=dict)


def region(box: tuple[float, float, float, float], padding: float, width: int,
           height: int) -> tuple[int, int, int, int] | None:
    """The pixel rectangle (x1, y1, x2, y2) a crop of ``box`` (frame fractions) covers: the box
    grown by ``padding`` times its size on each side, clipped to the frame; None if empty."""
    x1, y1, x2, y2 = box
    pw, ph = (x2 - x1) * padding, (y2 - y1) * padding
    # outwards to whole pixels; 1e-9 keeps a float's last bit (0.15 * 100 = 15.000000000000002)
    # from adding a pixel
    px1 = max(0, math.floor((x1 - pw) * width + 1e-9))
    py1 = max(0, math.floor((y1 - ph) * height + 1e-9))
    px2 = min(width, math.ceil((x2 + pw) * width - 1e-9))
    py2 = min(height, math.ceil((y2 + ph) * height - 1e-9))
    if px2 <= px1 or py2 <= py1:
        return None
    return px1, py1, px2, py2


def encode(crop: np.ndarray, quality: int, max_bytes: int) -> bytes | None:
    """``crop`` as a JPEG of at most ``max_bytes``: quality first, then size; None if even a
    small, low-quality one does not fit."""
    cv2 = _cv2()
    qualities = [quality, *(q for q in FALLBACK_QUALITIES if q < quality)]
    img = crop
    while min(img.shape[:2]) >= MIN_SIDE:
        for q in qualities:
            ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, q])
            if ok and buf.size <= max_bytes:
                return bytes(buf.tobytes())
        h, w = img.shape[:2]
        img = cv2.resize(img, (max(1, int(w * SHRINK)), max(1, int(h * SHRINK))),
                         interpolation=cv2.INTER_AREA)
        qualities = qualities[-1:]  # already the lowest quality that was allowed
    return None


class Snapshots:
    """One camera's kept best frames, per open track (event loop thread only)."""

    def __init__(self, node: str, camera: str, settings: SnapshotSettings) -> None:
        self.node = node
        self.camera = camera
        self.settings = settings
        self._kept: dict[int, _Kept] = {}
        self.counts = SnapshotCounts()

    def keep(self, track: int, image: np.ndarray, *, box: list[float], ts: float,
             score: float, label: str) -> None:
        """The track's best so far is ``box`` (frame fractions) in ``image``: keep its crop."""
        h, w = image.shape[:2]
        b = (float(box[0]), float(box[1]), float(box[2]), float(box[3]))
        r = region(b, self.settings.padding, w, h)
        if r is None:
            return
        x1, y1, x2, y2 = r
        crop = image[y1:y2, x1:x2]
        side = max(crop.shape[:2])
        if side > KEEP_MAX_SIDE:
            f = KEEP_MAX_SIDE / side
            crop = _cv2().resize(crop, (max(1, round(crop.shape[1] * f)),
                                        max(1, round(crop.shape[0] * f))),
                                 interpolation=_cv2().INTER_AREA)
        else:
            crop = crop.copy()  # the frame itself is not ours to keep
        self._kept[track] = _Kept(crop, (x1 / w, y1 / h, x2 / w, y2 / h), b, ts, score, label)

    def take(self, track: int, zones: Sequence[str] = ()) -> dict[str, Any] | None:
        """The track ended: its snapshot payload (``contract.snapshots.build_snapshot``; ``zones``
        every zone it visited), or None (not asked for at ``end``, nothing kept, or no JPEG
        fits; the last two counted). The kept crop is let go either way."""
        kept = self._kept.pop(track, None)
        if "end" not in self.settings.at:
            return None
        return self._payload(track, kept, "end", zones)

    def first(self, track: int, zones: Sequence[str] = ()) -> dict[str, Any] | None:
        """The track was just confirmed: the snapshot of the frame that confirmed it (what is
        kept now; ``zones`` those it is in), when the camera asks for one at ``new``; the crop
        stays kept for ``take``."""
        if "new" not in self.settings.at:
            return None
        return self._payload(track, self._kept.get(track), "new", zones)

    def _payload(self, track: int, kept: _Kept | None, at: str,
                 zones: Sequence[str]) -> dict[str, Any] | None:
        if kept is None:
            self._drop("no_frame", track)
            return None
        jpeg = encode(kept.crop, self.settings.quality, self.settings.max_bytes)
        if jpeg is None:
            self._drop("too_large", track)
            return None
        self.counts.sent += 1
        self.counts.bytes += len(jpeg)
        h, w = kept.crop.shape[:2]
        return wire.build_snapshot(node=self.node, camera=self.camera, track=track,
                                   label=kept.label, ts=kept.ts, score=kept.score, box=kept.box,
                                   crop=kept.region, width=w, height=h, jpeg=jpeg, at=at,
                                   zones=zones)

    def _drop(self, reason: str, track: int) -> None:
        d = self.counts.dropped
        d[reason] = d.get(reason, 0) + 1
        log.warning("snapshot_dropped", camera=self.camera, track=track, reason=reason,
                    total=d[reason])
