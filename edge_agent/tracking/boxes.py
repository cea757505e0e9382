"""norfair specialised to whole boxes: the same bookkeeping and distances, a fraction of the cost.

Why: with the filter made cheap (``kalman``), two thirds of a frame's tracking time went to
norfair's ``TrackedObject.hit`` (about 30 us per matched object on one x86 core), and most of
the rest to its ``"iou"`` distance. ``hit`` serves what our detections never have: per-point
scores (a pose whose wrist was missed), points detected for the first time (the masks that zero
their velocity), a ReID history; it builds an identity measurement matrix, masks and copies
for every match. For a detection without scores, measured whole, each of those masks is all
``True`` from the object's creation on, so ``hit`` reduces to its counters, the match flags and
one filter update: ``BoxTrackedObject.hit``. The distance stacks every object's estimate
through three array calls each and checks the boxes in a Python loop on every call:
``BoxIoU`` reads the boxes from the filters' state and computes the same ``1 - IoU``.

norfair creates its objects through its ``_TrackedObjectFactory``; ``install(tracker)`` gives a
``Tracker`` a factory making ``BoxTrackedObject`` (for detections without scores, no past
detections kept, a ``BoxKalman`` filter; norfair's own object otherwise) and ``BoxIoU`` for its
``"iou"`` distance (``Distance`` is norfair's documented extension class). The factory and
``hit``'s bookkeeping are norfair internals, so this is used only with the versions it was
checked against (``CHECKED_VERSIONS``, the one pinned in the images): with any other, ``install``
leaves norfair as it is (correct, slower) and says so once in the log.
tests/agent/tracking/test_boxes.py runs the same scenes through both and asserts identical ids,
counters, estimates and distances on every frame.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
from typing import Any

import numpy as np
import structlog
from numpy.typing import NDArray

from edge_agent.tracking.kalman import BoxKalmanFactory

log = structlog.get_logger(__name__)

#: norfair-enough versions whose ``TrackedObject.hit`` this reproduces (read and tested).
CHECKED_VERSIONS = frozenset({"2.4.3"})
DISTRIBUTION = "norfair-enough"


@functools.cache
def norfair_version() -> str | None:
    """The installed norfair-enough's version (None: not installed); read once per process
    (each camera's tracker asks)."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None


def checked() -> bool:
    """Whether the installed norfair is one ``BoxTrackedObject`` was checked against."""
    return norfair_version() in CHECKED_VERSIONS


def one_minus_iou(a: NDArray[np.float64], b: NDArray[np.float64]) -> NDArray[np.float64]:
    """``1 - IoU`` of each box of ``a`` (n, 4) with each of ``b`` (k, 4): (n, k).

    Boxes are (x1, y1, x2, y2); a pair whose union is empty counts as not overlapping (1).
    The arithmetic of ``norfair.distances.iou``, without its per-call checks of the boxes
    (a Python loop over them: half of its cost at 20 boxes).
    """
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = bottom_right - top_left
    np.maximum(wh, 0.0, out=wh)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b - inter
    ratio = np.zeros_like(inter)
    np.divide(inter, union, out=ratio, where=union > 0)
    result: NDArray[np.float64] = 1.0 - ratio
    return result


@functools.cache
def object_type() -> type:
    """``BoxTrackedObject`` (made on first use: norfair is imported only when a camera tracks)."""
    tracker = importlib.import_module("norfair.tracker")

    class BoxTrackedObject(tracker.TrackedObject):  # type: ignore[misc,name-defined]
        """norfair's ``TrackedObject`` for a box measured whole, made by the factory only from
        a detection without scores, with no past detections kept and a ``BoxKalman`` filter:
        every point counts as detected from its creation on."""

        hit_counter: int
        is_initializing: bool

        def hit(self, detection: Any, period: int = 1) -> None:
            if detection.scores is not None:
                super().hit(detection, period)
                return
            # norfair's order of operations, less what is a no-op for a whole box. norfair
            # keeps a shallow copy so as not to set the caller's ``age``: our caller makes
            # the detections for this one update, so the copy is skipped
            detection.age = self.age
            self.last_detection = detection
            self.hit_counter = min(self.hit_counter + 2 * period, self.hit_counter_max)
            self.scores = None
            if self.is_initializing and self.hit_counter > self.initialization_delay:
                self.is_initializing = False
                self._acquire_ids()
                self.hit_counter = self.hit_counter_max
            if self.hit_counter >= 0:
                self.reid_hit_counter = None
            # the points are measured together, so their counters are equal: norfair's
            # add-then-clip on one of them, written to all
            counters = self.point_hit_counter
            counters.fill(max(min(int(counters[0]) + 2 * period,
                                  self.pointwise_hit_counter_max), 0))
            # every point matched in this frame (norfair: a logical or with an all-True mask)
            self._point_matched_in_current_frame.fill(True)
            self.filter.update_box(detection.absolute_points)
            # every point was detected at its creation (no scores): no first detections, so
            # no positions to reset and no velocities to zero

        def get_estimate(self, absolute: bool = False) -> Any:
            if self.abs_to_rel is not None or absolute:
                return super().get_estimate(absolute)
            # the positions as (points, dimensions): norfair transposes and flattens the
            # state column to get there; the column's first rows reshape to the same, copied
            return self.filter.x[: self.dim_z].reshape(self.num_points, self.dim_points).copy()

    return BoxTrackedObject


@functools.cache
def factory_type() -> type:
    """norfair's object factory, making ``BoxTrackedObject`` where it applies."""
    tracker = importlib.import_module("norfair.tracker")
    base = tracker._TrackedObjectFactory  # noqa: SLF001 - version-checked (module docstring)

    class BoxObjectFactory(base):  # type: ignore[misc,valid-type]
        def create(self, **kwargs: Any) -> Any:
            whole_box = (kwargs["initial_detection"].scores is None
                         and not kwargs["past_detections_length"]
                         and isinstance(kwargs["filter_factory"], BoxKalmanFactory))
            cls = object_type() if whole_box else tracker.TrackedObject
            return cls(obj_factory=self, **kwargs)

    return BoxObjectFactory


def _boxes(items: Any, idx: list[int], detection_type: Any) -> NDArray[np.float64]:
    # (n, 4): a BoxTrackedObject's estimate is its state's first four rows; a detection is
    # its points; anything else (norfair's own objects) its estimate
    box_object: Any = object_type()
    rows = []
    for i in idx:
        item: Any = items[i]
        if type(item) is box_object and item.abs_to_rel is None:
            rows.append(item.filter.x[:4, 0])
        elif isinstance(item, detection_type):
            rows.append(item.points.ravel())
        else:
            rows.append(item.estimate.ravel())
    return np.stack(rows)


@functools.cache
def distance_type() -> type:
    """``BoxIoU``: norfair's ``"iou"`` distance with less overhead per call."""
    distances = importlib.import_module("norfair.distances")
    detection_type = importlib.import_module("norfair.tracker").Detection

    class BoxIoU(distances.Distance):  # type: ignore[misc,name-defined]
        """1 - IoU between each candidate's box and each object's estimated box, per label,
        inf across labels: norfair's vectorised ``"iou"``, the same matrix."""

        def get_distances(self, objects: Any, candidates: Any) -> NDArray[np.float64]:
            n_cand = len(candidates) if candidates is not None else 0
            matrix = np.full((n_cand, len(objects)), np.inf)
            if not n_cand or not objects:
                return matrix
            by_label: dict[Any, tuple[list[int], list[int]]] = {}
            for i, o in enumerate(objects):
                by_label.setdefault(o.label, ([], []))[0].append(i)
            for j, c in enumerate(candidates):
                group = by_label.get(c.label)
                if group is not None:
                    group[1].append(j)
            for obj_idx, cand_idx in by_label.values():
                if not cand_idx:
                    continue
                block = one_minus_iou(_boxes(candidates, cand_idx, detection_type),
                                      _boxes(objects, obj_idx, detection_type))
                if len(by_label) == 1 and len(cand_idx) == n_cand:
                    return block  # one label on both sides: the block is the matrix
                matrix[np.ix_(cand_idx, obj_idx)] = block
            return matrix

    return BoxIoU


@functools.cache
def warn_unchecked() -> None:
    """Say once per process that the fast path is off (``cache_clear`` to say it again)."""
    log.warning("tracker_fast_path_off", norfair=norfair_version() or "unknown",
                checked=sorted(CHECKED_VERSIONS),
                why="norfair's object internals are unverified for this version: its own "
                    "(slower) objects and distance are used")


def install(norfair_tracker: Any) -> bool:
    """Give ``norfair_tracker`` (before its first update) ``BoxTrackedObject`` and ``BoxIoU``.

    Returns whether it did (False, and one warning per process, for an unchecked version).
    """
    if not checked():
        warn_unchecked()
        return False
    norfair_tracker._obj_factory = factory_type()()  # noqa: SLF001 - version-checked
    iou = importlib.import_module("norfair.distances").iou
    if getattr(norfair_tracker.distance_function, "distance_function", None) is iou:
        norfair_tracker.distance_function = distance_type()()
    return True
