"""norfair specialised to whole boxes (``tracking.boxes``) tracks exactly as norfair's own objects
and distance do, frame by frame, and steps aside where it does not apply."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import structlog
from norfair import Detection, Tracker
from norfair.distances import get_distance_by_name, iou
from norfair.tracker import TrackedObject

from edge_agent.config.tracking import TrackingSettings
from edge_agent.tracking import boxes
from edge_agent.tracking.kalman import BoxKalmanFactory
from edge_agent.tracking.tracker import ObjectTracker

W, H = 1920.0, 1080.0


def _scene(n: int, frames: int, seed: int) -> list[tuple[np.ndarray, list[str]]]:
    """Boxes of ``n`` objects of two labels walking (and wrapping) over a frame, each missed in
    one frame of ten, some crossing each other; one in five frames also has a one-frame
    false positive."""
    rng = np.random.default_rng(seed)
    size = rng.uniform(30, 140, n)
    pos = np.stack([rng.uniform(0, W, n), rng.uniform(0, H, n)], axis=1)
    vel = rng.uniform(-9, 9, (n, 2))
    labels = np.array(["person", "car"])[rng.integers(0, 2, n)]
    out = []
    for k in range(frames):
        pos += vel
        pos[:, 0] %= W
        pos[:, 1] %= H
        seen = rng.random(n) > 0.1
        half = size[seen, None] / 2
        c = pos[seen] + rng.normal(0, 1.5, (int(seen.sum()), 2))
        frame_boxes = np.concatenate([c - half, c + half], axis=1)
        frame_labels = list(labels[seen])
        if k % 5 == 0:
            x, y = rng.uniform(0, W - 50), rng.uniform(0, H - 50)
            frame_boxes = np.vstack([frame_boxes, [x, y, x + 50, y + 50]])
            frame_labels.append("person")
        out.append((frame_boxes, frame_labels))
    return out


def _stock_tracker(monkeypatch: pytest.MonkeyPatch) -> ObjectTracker:
    with monkeypatch.context() as m:
        m.setattr(boxes, "install", lambda tracker: False)
        return ObjectTracker(TrackingSettings(), next_id=1)


def _state(obj: Any) -> tuple[Any, ...]:
    return (obj.id, obj.initializing_id, obj.hit_counter, obj.reid_hit_counter, obj.age,
            obj.is_initializing, obj.label, obj.point_hit_counter.tolist(),
            obj.live_points.tolist(), obj.last_detection.data, obj.last_detection.age,
            obj.estimate.tolist())


@pytest.mark.parametrize(("n", "seed"), [(5, 1), (20, 2), (60, 3)])
def test_same_tracks_counters_and_estimates_as_norfairs_own_objects(
        monkeypatch: pytest.MonkeyPatch, n: int, seed: int) -> None:
    stock = _stock_tracker(monkeypatch)
    fast = ObjectTracker(TrackingSettings(), next_id=1)
    box_object = boxes.object_type()
    stock_iou = get_distance_by_name("iou")
    compared = 0
    for k, (frame_boxes, labels) in enumerate(_scene(n, 250, seed)):
        scores = [0.9] * len(labels)
        ours, theirs = (t.step(k / 25, frame_boxes, scores, labels) for t in (fast, stock))
        assert (ours.matched, ours.new, ours.ended) == (theirs.matched, theirs.new,
                                                        theirs.ended), f"frame {k}"
        fast_objs, stock_objs = fast.norfair.tracked_objects, stock.norfair.tracked_objects
        assert [_state(o) for o in fast_objs] == [_state(o) for o in stock_objs], f"frame {k}"
        assert all(type(o) is box_object for o in fast_objs)
        assert not any(type(o) is box_object for o in stock_objs)
        compared += len(fast_objs)
        # the distance from these objects to the next frame's boxes: the same matrix
        if k % 10 == 0 and fast_objs:
            dets = [Detection(points=b.reshape(2, 2), label=lb)
                    for b, lb in zip(frame_boxes + 3.0, labels, strict=True)]
            np.testing.assert_array_equal(
                fast.norfair.distance_function.get_distances(fast_objs, dets),
                stock_iou.get_distances(fast_objs, dets))
    assert compared > n * 200  # the comparison had objects in it
    assert fast.next_id == stock.next_id > n  # and tracks were confirmed and ended
    assert isinstance(fast.norfair.distance_function, boxes.distance_type())


def test_one_minus_iou_is_norfairs_iou_including_degenerate_boxes() -> None:
    rng = np.random.default_rng(5)
    xy = rng.uniform(0, 100, (40, 2))
    wh = rng.uniform(0, 30, (40, 2))
    a = np.concatenate([xy, xy + wh], axis=1)
    b = np.vstack([a[:15] + rng.normal(0, 3, (15, 4)),
                   [[10, 10, 10, 10], [0, 0, 1, 1], [5, 5, 5, 20]]])  # empty, tiny, a line
    b[:, 2:] = np.maximum(b[:, 2:], b[:, :2])
    np.testing.assert_array_equal(boxes.one_minus_iou(a, b), iou(a, b))
    zero = np.array([[3.0, 3.0, 3.0, 3.0]])
    assert boxes.one_minus_iou(zero, zero).tolist() == [[1.0]]  # empty union: no overlap


def test_detections_with_scores_and_past_detections_keep_norfairs_objects() -> None:
    rng = np.random.default_rng(9)
    start = rng.uniform(100, 800, (6, 2))
    results = []
    for installed in (True, False):
        tracker = Tracker(distance_function="iou", distance_threshold=0.7,
                          initialization_delay=1, past_detections_length=4,
                          filter_factory=cast(Any, BoxKalmanFactory()))  # duck-typed
        if installed:
            assert boxes.install(tracker)
        estimates = []
        for k in range(30):
            pts = [np.array([p + k * 2, p + k * 2 + 40]) for p in start]
            active = tracker.update([Detection(points=p, scores=np.array([0.9, 0.8]))
                                     for p in pts])
            estimates.append([(o.id, o.estimate.round(9).tolist()) for o in active])
        assert all(type(o) is TrackedObject for o in tracker.tracked_objects)
        results.append(estimates)
    assert results[0] == results[1]
    assert len(results[0][-1]) == 6


def test_an_unchecked_norfair_version_keeps_norfair_as_it_is(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(boxes, "CHECKED_VERSIONS", frozenset({"0.0.0"}))
    boxes.warn_unchecked.cache_clear()
    try:
        with structlog.testing.capture_logs() as logs:
            t = ObjectTracker(TrackingSettings(), next_id=1)
            ObjectTracker(TrackingSettings(), next_id=1)
        warnings = [e for e in logs if e["event"] == "tracker_fast_path_off"]
        assert len(warnings) == 1  # once per process, not per camera
        assert warnings[0]["norfair"] == boxes.norfair_version()
        for k in range(12):
            step = t.step(k / 25, [[10 + k, 10, 60 + k, 60]], [0.9], ["person"])
        assert step.matched == [(1, 0)]
        assert all(type(o) is TrackedObject for o in t.norfair.tracked_objects)
    finally:
        boxes.warn_unchecked.cache_clear()


def test_the_pinned_norfair_is_a_checked_one() -> None:
    # the images pin the version this was read against (and so does this environment): a
    # bump must come with a re-check of BoxTrackedObject.hit against norfair's
    assert boxes.checked(), (boxes.norfair_version(), sorted(boxes.CHECKED_VERSIONS))
    constraints = (Path(__file__).resolve().parents[3] / "Dockerfile.arm64.constraints")
    pins = re.findall(r"^norfair-enough==(\S+)", constraints.read_text(), flags=re.M)
    assert len(pins) == 1 and pins[0] in boxes.CHECKED_VERSIONS, pins
