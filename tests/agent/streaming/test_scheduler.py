"""The scheduler's counts, under real concurrency: every frame offered is accounted for once.

Several capture threads offer at once while several workers infer on a real ONNX Runtime
session; a lost update in any counter (a camera's drops, a worker's frames or failures) would
break the exact sums these tests check.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.capture.camera import Camera, Frame
from edge_agent.config import CameraSettings, EngineSettings
from edge_agent.inference.engine import LoadedModel
from edge_agent.streaming import scheduler as scheduling
from edge_agent.streaming.metrics import AgentMetrics
from edge_agent.streaming.slots import ModelSlot

CAMERAS = 4
FRAMES = 250


@pytest.fixture
def head(models_dir: Path) -> Iterator[LoadedModel]:
    model = LoadedModel.load(models_dir / "yolov8-head" / "manifest.json",
                             EngineSettings(warmup_runs=1))
    yield model
    model.close()


def _run_cameras(sched: scheduling.Scheduler, model: LoadedModel, cameras: list[Camera],
                 *, unprepared_every: int) -> None:
    """One thread per camera offers ``FRAMES`` frames as fast as it can (capture threads)."""
    img = np.zeros((120, 160, 3), np.uint8)
    prepared = scheduling.prepare(model, img)
    start = threading.Barrier(len(cameras))

    def capture(cam: Camera) -> None:
        start.wait()
        for k in range(FRAMES):
            # a frame read before any model served: nothing prepared it, the scheduler drops it
            p = None if k % unprepared_every == 0 else prepared
            sched.offer(Frame(cam.name, model.name, k, time.time(), time.perf_counter(), 160,
                              120, img, p), cam)

    threads = [threading.Thread(target=capture, args=(c,)) for c in cameras]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)


def _cameras(sched: scheduling.Scheduler, model: str) -> list[Camera]:
    return [Camera(CameraSettings(name=f"c{i}", url="test://pattern", model=model), sched)
            for i in range(CAMERAS)]


def test_every_offered_frame_is_inferred_or_counted_dropped_once(head: LoadedModel) -> None:
    emitted: list[tuple[float, dict[str, Any]]] = []
    sched = scheduling.Scheduler(node="n", slots={head.name: ModelSlot(head.name, head)},
                                 workers=3, emit=emitted.extend, metrics=AgentMetrics(),
                                 batch_limits={head.name: 2})
    cams = _cameras(sched, head.name)
    sched.start()
    _run_cameras(sched, head, cams, unprepared_every=7)
    assert sched.stop(drain=True, timeout=60)
    per_camera = collections.Counter(r["camera"] for _, r in emitted)
    for cam in cams:
        assert per_camera[cam.name] + cam.dropped == FRAMES, cam.name
        assert cam.dropped >= -(-FRAMES // 7)  # at least every unprepared frame
    counts = sched.tally()
    assert counts.frames == len(emitted) and counts.errors == 0
    assert 0 < counts.batches <= counts.frames
    assert all(r["model"] == {"name": head.name, "version": head.version} for _, r in emitted)


def test_failures_are_counted_per_model_version_across_workers(models_dir: Path) -> None:
    nan = LoadedModel.load(models_dir / "bad-nan" / "manifest.json",
                           EngineSettings(warmup_runs=1))
    try:
        emitted: list[tuple[float, dict[str, Any]]] = []
        sched = scheduling.Scheduler(node="n", slots={nan.name: ModelSlot(nan.name, nan)},
                                     workers=3, emit=emitted.extend, metrics=AgentMetrics())
        cams = _cameras(sched, nan.name)
        sched.start()
        _run_cameras(sched, nan, cams, unprepared_every=FRAMES + 1)  # all prepared
        assert sched.stop(drain=True, timeout=60)
    finally:
        nan.close()
    counts = sched.tally()
    failed = CAMERAS * FRAMES - sum(c.dropped for c in cams)
    assert emitted == [] and counts.frames == 0
    assert counts.errors == failed > 0
    assert counts.errors_by_model == {(nan.name, nan.version): failed}
