"""One camera's multi-object tracker: detections in, stable track ids out (norfair inside).

Why a wrapper: norfair (``norfair-enough``, BSD-3) does the association (IoU between each
track's Kalman-predicted box and the frame's boxes, per label) but counts age in frames and
numbers its objects from 0 in every process. The agent needs ages in seconds (cameras run at
any rate, and a motion-gated camera skips frames) and ids that are never reused in a day
across restarts, so this module owns the ids and the time rule and hands norfair only boxes.

The API (what ``edge_agent.tracking.camera`` and ``bench/`` call)::

    t = ObjectTracker(settings.tracking, next_id=1_000)   # next_id: the first id to hand out
    step = t.step(ts, boxes_px, scores, labels)            # one frame; boxes (x1, y1, x2, y2)
    step.matched   # [(track_id, detection index)] of confirmed tracks seen in this frame
    step.new       # track ids confirmed in this frame (also in ``matched``)
    step.ended     # track ids that ended in this frame (not seen for max_age_s, or dropped)
    t.next_id      # the id the next confirmed track gets (persist it to never reuse ids)
    t.active       # confirmed track ids alive now

Boxes are in pixels (norfair's Kalman noise is tuned for pixel units; IoU is scale-free).
A track id is given when a track is *confirmed* (matched in ``min_hits`` frames), so a
one-frame false positive never consumes an id. norfair's Kalman filter, tracked objects and
IoU distance are replaced by the same model and bookkeeping specialised to whole boxes
(``kalman`` and ``boxes``: the same tracks and estimates, about a quarter of the cost).
Cost: about 0.4 ms a frame at 20 objects on one x86 core (``bench/events.py`` measures it at
5, 20 and 100 objects against norfair as shipped).
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_agent.config.tracking import TRACKER_MISSING, TRACKER_MODULE, TrackingSettings
from edge_agent.tracking import boxes, kalman

if TYPE_CHECKING:
    from norfair.tracker import TrackedObject


def _norfair() -> Any:
    """norfair, imported on first use: it brings scipy (tens of MB resident), which an agent
    whose cameras publish frames only never needs.

    It is an optional extra (``tracking``): the settings refuse a camera that tracks where it
    is missing (``config.tracking.tracking_problems``), so this error is for a caller that
    skipped them; it says which image or extra to install.
    """
    try:
        return importlib.import_module(TRACKER_MODULE)
    except ImportError as exc:
        raise ImportError(f"{TRACKER_MISSING} ({exc})", name=TRACKER_MODULE) from exc


#: Frame rate assumed until a camera's own is measured (frames per second).
INITIAL_FPS = 15.0
#: Bounds of norfair's per-object frame budget (``hit_counter_max``).
MIN_FRAMES, MAX_FRAMES = 4, 600


@dataclass(slots=True)
class Step:
    """What one frame changed (see the module docstring)."""

    matched: list[tuple[int, int]] = field(default_factory=list)
    new: list[int] = field(default_factory=list)
    ended: list[int] = field(default_factory=list)


@functools.cache
def _detection_type() -> Any:
    """norfair's ``Detection`` with a cheap shallow copy (norfair copies every matched one;
    ``copy.copy``'s generic path costs more than the rest of making one)."""

    class BoxDetection(_norfair().Detection):  # type: ignore[misc]
        def __copy__(self) -> BoxDetection:
            new = object.__new__(type(self))
            new.__dict__.update(self.__dict__)
            return new

    return BoxDetection


class ObjectTracker:
    """A camera's tracker; one thread at a time (the event loop), no lock."""

    def __init__(self, settings: TrackingSettings, *, next_id: int) -> None:
        self.settings = settings
        #: The id the next confirmed track gets.
        self.next_id = next_id
        self._fps = INITIAL_FPS
        self._last_ts: float | None = None
        self._frame = 0
        self._tracker = self._new_norfair()
        # norfair object -> our id (confirmed), and our id -> last time it was matched
        self._ids: dict[TrackedObject, int] = {}
        self._seen: dict[int, float] = {}

    @property
    def norfair(self) -> Any:
        """The norfair ``Tracker`` inside (its objects: ``norfair.tracked_objects``)."""
        return self._tracker

    @property
    def active(self) -> list[int]:
        """Confirmed track ids alive now."""
        return list(self._seen)

    def _frames_for_age(self) -> int:
        n = math.ceil(self.settings.max_age_s * self._fps)
        return max(MIN_FRAMES, self.settings.min_hits + 1, min(MAX_FRAMES, n))

    def _measure_fps(self, ts: float) -> None:
        if self._last_ts is not None:
            dt = ts - self._last_ts
            if 0 < dt < 10:
                self._fps = 0.9 * self._fps + 0.1 * (1.0 / dt)
                # norfair copies this into objects it creates from now on
                self._tracker.hit_counter_max = self._frames_for_age()
        self._last_ts = ts

    def step(self, ts: float, boxes: Sequence[Sequence[float]] | np.ndarray,
             scores: Sequence[float], labels: Sequence[str]) -> Step:
        """Track one frame's detections (``boxes[i]`` in pixels, ``scores[i]``, ``labels[i]``).

        ``ts`` is the frame's capture time (seconds, increasing). Returns what changed.
        """
        self._measure_fps(ts)
        self._frame += 1
        frame = self._frame
        detection = _detection_type()
        points = np.asarray(boxes, dtype=np.float64).reshape(-1, 2, 2)
        dets = [detection(points=p, label=labels[i], data=(frame, i))
                for i, p in enumerate(points)]
        active = self._tracker.update(detections=dets)
        out = Step()
        alive: set[TrackedObject] = set()
        for obj in active:
            alive.add(obj)
            det = obj.last_detection
            data = det.data if det is not None else None
            matched_now = isinstance(data, tuple) and data[0] == frame
            tid = self._ids.get(obj)
            if tid is not None and tid not in self._seen:
                # ended by the time rule while norfair kept it: seen again, it is a new track
                tid = None
            if tid is None:
                if not matched_now:
                    continue
                tid = self._ids[obj] = self.next_id
                self.next_id += 1
                out.new.append(tid)
            if matched_now and data is not None:
                out.matched.append((tid, int(data[1])))
                self._seen[tid] = ts
        max_age = self.settings.max_age_s
        kept = {id(o) for o in self._tracker.tracked_objects}
        for obj, tid in list(self._ids.items()):
            gone = obj not in alive and id(obj) not in kept
            if gone:
                del self._ids[obj]
            last = self._seen.get(tid)
            if last is not None and (gone or ts - last > max_age):
                del self._seen[tid]
                out.ended.append(tid)
        return out

    def close_all(self) -> list[int]:
        """End every track (a camera stopped): their ids, and a fresh norfair state."""
        ended = list(self._seen)
        self._seen.clear()
        self._ids.clear()
        self._tracker = self._new_norfair()
        return ended

    def _new_norfair(self) -> Any:
        # norfair's Kalman model through a filter specialised to whole boxes (``kalman``)
        tracker = _norfair().Tracker(
            distance_function="iou",
            distance_threshold=self.settings.max_distance,
            hit_counter_max=self._frames_for_age(),
            initialization_delay=self.settings.min_hits - 1,
            past_detections_length=0,
            filter_factory=kalman.BoxKalmanFactory(),
        )
        # and its objects specialised to whole boxes (``boxes``: same bookkeeping, cheaper)
        boxes.install(tracker)
        return tracker
