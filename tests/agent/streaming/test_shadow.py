"""A candidate in shadow: real ONNX Runtime sessions on the real models, a real agent pipeline.

The runner is fed the way the scheduler's workers feed it (``after_batch`` with the active
version's real output), or by the real workers of a running agent; nothing is mocked.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import structlog

from edge_agent.app.compose import Agent
from edge_agent.config import EngineSettings
from edge_agent.inference.engine import LoadedModel
from edge_agent.streaming import shadow as shadowing
from edge_agent.streaming.shadow import ShadowRunner
from edge_agent.streaming.slots import ModelSlot
from tests.support.pipeline import RecordingSink, agent_settings
from tests.support.waiting import until, wait_until

ENGINE = EngineSettings(providers=["cpu"], warmup_runs=1)
SAMPLES = ("chelsea.png", "astronaut.png", "coffee.png")


def variant(models_dir: Path, tmp: Path, name: str, version: str, **changes: Any) -> Path:
    """A copy of a real model's manifest as another version (its ONNX file linked, not
    copied), with ``changes`` applied (e.g. shuffled labels)."""
    src = models_dir / name / "manifest.json"
    data = json.loads(src.read_text())
    data.update(version=version, **changes)
    d = tmp / f"{name}-{version}"
    d.mkdir(parents=True)
    os.symlink(models_dir / name / data["file"], d / data["file"])
    (d / "manifest.json").write_text(json.dumps(data))
    return d / "manifest.json"


def feed(runner: ShadowRunner, active: LoadedModel, images: list[np.ndarray],
         busy_s: float = 1.0) -> None:
    """Offer each image with the active model's real output, as a worker does, one at a time
    (each waits until the shadow thread took the previous one)."""
    for img in images:
        before = runner.counts.samples + runner.counts.errors
        runner.after_batch(active, [(img, active.infer(img).output)], busy_s)

        def done(b: int = before) -> bool:
            return runner.counts.samples + runner.counts.errors > b

        wait_until(done, timeout=30, what="the shadow sample")


@pytest.fixture(scope="module")
def images(models_dir: Path) -> list[np.ndarray]:
    out = []
    for name in SAMPLES:
        img = cv2.imread(str(models_dir / "samples" / name))
        assert img is not None
        out.append(img)
    return out


# ------------------------------------------------------------------------------- agreement


def test_agreement_of_detections_and_classes() -> None:
    box = {"label": "face", "box": [0.1, 0.1, 0.3, 0.3]}
    moved = {"label": "face", "box": [0.12, 0.1, 0.32, 0.3]}  # IoU ~0.82
    far = {"label": "face", "box": [0.5, 0.5, 0.6, 0.6]}
    other = {"label": "car", "box": [0.1, 0.1, 0.3, 0.3]}
    f1 = shadowing.agreement
    assert f1({"detections": []}, {"detections": []}) == 1.0
    assert f1({"detections": [box]}, {"detections": [moved]}) == 1.0
    assert f1({"detections": [box]}, {"detections": []}) == 0.0
    assert f1({"detections": [box]}, {"detections": [other]}) == 0.0  # same box, other label
    assert f1({"detections": [box, far]}, {"detections": [moved]}) == pytest.approx(2 / 3)
    # one-to-one: two candidate boxes on one active box match once
    assert f1({"detections": [box]}, {"detections": [box, moved]}) == pytest.approx(2 / 3)
    top = {"classes": [{"id": 1, "label": "cat", "score": 0.9}]}
    assert f1(top, {"classes": [{"id": 7, "label": "cat", "score": 0.2}]}) == 1.0
    assert f1(top, {"classes": [{"id": 1, "label": "dog", "score": 0.9}]}) == 0.0
    assert f1(top, {"detections": []}) == 0.0  # different kinds of output
    # boxes clipped to zero area at the frame's edge: the same one matches, another does not
    flat = {"label": "face", "box": [0.8, 0.0, 1.0, 0.0]}
    assert f1({"detections": [flat]}, {"detections": [dict(flat)]}) == 1.0
    assert f1({"detections": [flat]}, {"detections": [{**flat, "box": [0.7, 0, 1, 0]}]}) == 0.0


def test_runner_refuses_a_budget_outside_its_range() -> None:
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="max_slowdown"):
            ShadowRunner({}, max_slowdown=bad)


# ----------------------------------------------------------------- runner on real models


def test_same_model_agrees_and_shuffled_labels_do_not(
    models_dir: Path, tmp_path: Path, images: list[np.ndarray]
) -> None:
    active = LoadedModel.load(models_dir / "efficientnet-lite0" / "manifest.json", ENGINE)
    labels = json.loads((models_dir / "efficientnet-lite0" / "manifest.json").read_text())
    same = LoadedModel.load(variant(models_dir, tmp_path, "efficientnet-lite0", "1.0.1"), ENGINE)
    shuffled = LoadedModel.load(variant(models_dir, tmp_path, "efficientnet-lite0", "1.0.2",
                                        labels=labels["labels"][::-1]), ENGINE)
    slots = {"efficientnet-lite0": ModelSlot("efficientnet-lite0", active)}
    runner = ShadowRunner(slots, max_slowdown=0.5)
    try:
        runner.swap("efficientnet-lite0", same)
        feed(runner, active, images)
        win = runner.take_window()[("efficientnet-lite0", "1.0.0")]
        assert (win.version, win.samples, win.errors) == ("1.0.1", 3, 0)
        assert win.agreement_sum == pytest.approx(3.0)
        assert runner.swap("efficientnet-lite0", shuffled) is same
        feed(runner, active, images)
        win = runner.take_window()[("efficientnet-lite0", "1.0.0")]
        assert (win.version, win.samples) == ("1.0.2", 3)
        assert win.agreement_sum / win.samples <= 0.34, win
        assert win.busy_s > 0 and win.active_busy_s == pytest.approx(3.0)
    finally:
        runner.close()
        active.close()
        same.close()


def test_detector_and_faces_agree_with_themselves(
    models_dir: Path, tmp_path: Path, images: list[np.ndarray]
) -> None:
    for name in ("centerface", "yolov8n-like"):
        active = LoadedModel.load(models_dir / name / "manifest.json", ENGINE)
        runner = ShadowRunner({name: ModelSlot(name, active)}, max_slowdown=0.5)
        try:
            runner.swap(name, LoadedModel.load(variant(models_dir, tmp_path, name, "9"), ENGINE))
            feed(runner, active, images)
            win = runner.take_window()[(name, "1.0.0")]
            assert (win.samples, win.errors) == (3, 0)
            assert win.agreement_sum == pytest.approx(3.0), name
        finally:
            runner.close()
            active.close()


def test_failing_candidate_is_counted_and_never_compared(
    models_dir: Path, images: list[np.ndarray]
) -> None:
    active = LoadedModel.load(models_dir / "tiny-classifier" / "manifest.json", ENGINE)
    runner = ShadowRunner({"tiny-classifier": ModelSlot("tiny-classifier", active)},
                          max_slowdown=0.5)
    try:  # loaded directly (model sync's checks would refuse it): NaN on every frame
        runner.swap("tiny-classifier",
                    LoadedModel.load(models_dir / "bad-nan" / "manifest.json", ENGINE))
        with structlog.testing.capture_logs() as logs:
            feed(runner, active, images)
        win = runner.take_window()[("tiny-classifier", "1.0.0")]
        assert (win.samples, win.errors, win.agreement_sum) == (0, 3, 0.0)
    finally:
        runner.close()
        active.close()
    failed = [e for e in logs if e["event"] == "shadow_inference_failed"]
    assert len(failed) == 1 and "NonFinite" in failed[0]["error"], logs  # one line per burst


def test_offers_while_busy_or_over_budget_are_skipped(
    models_dir: Path, images: list[np.ndarray]
) -> None:
    active = LoadedModel.load(models_dir / "tiny-classifier" / "manifest.json", ENGINE)
    runner = ShadowRunner({"tiny-classifier": ModelSlot("tiny-classifier", active)},
                          max_slowdown=0.1)
    try:
        out = active.infer(images[0]).output
        # no candidate: nothing counted at all
        runner.after_batch(active, [(images[0], out)], 1.0)
        assert runner.take_window() == {}
        runner.swap("tiny-classifier",
                    LoadedModel.load(models_dir / "tiny-classifier" / "manifest.json", ENGINE))
        # a batch of 4: at most one frame goes, the rest are skipped, never queued
        # (its credit, 0.1 x 1 us, is far less than the sample costs)
        runner.after_batch(active, [(images[0], out)] * 4, 1e-6)
        wait_until(lambda: runner.counts.samples == 1, what="the one sample")
        # that sample spent more than the credit: everything now is over budget
        runner.after_batch(active, [(images[0], out)] * 5, 1e-6)
        win = runner.take_window()[("tiny-classifier", "1.0.0")]
        assert (win.samples, win.skipped) == (1, 3 + 5)
    finally:
        runner.close()
        active.close()


# ------------------------------------------------------------------ in the running agent


def video_camera(models_dir: Path, name: str, model: str) -> dict[str, Any]:
    return {"name": name, "url": str(models_dir / "samples" / "bikes.mp4"), "model": model,
            "loop": True, "rate": "max"}


async def test_agent_runs_the_shadow_within_budget_and_publishes_only_the_active(
    tmp_path: Path, models_dir: Path
) -> None:
    sink = RecordingSink()
    s = agent_settings(tmp_path, models_dir, [video_camera(models_dir, "cam", "centerface")],
                       models=("centerface",), http=False, pipeline={"workers": 1},
                       model_sync={"shadow_max_slowdown": 0.2})
    agent = Agent(s, sink=sink)
    await agent.start()
    windows: list[Any] = []
    try:
        cand = LoadedModel.load(variant(models_dir, tmp_path, "centerface", "2.0.0"), ENGINE)
        assert agent.shadow.swap("centerface", cand) is None
        del cand
        await until(lambda: agent.shadow.counts.samples >= 4, timeout=90, what="shadow samples")
        assert agent.pipeline is not None
        # the telemetry provider carries it on the active version's entry
        tel = agent.pipeline.telemetry_models()
        entry = next(m for m in tel if (m.name, m.version) == ("centerface", "1.0.0"))
        assert entry.shadow is not None and entry.shadow.version == "2.0.0"
        windows.append(entry.shadow)
        n = agent.shadow.counts.samples
        await until(lambda: agent.shadow.counts.samples >= n + 3, timeout=90, what="more")
    finally:
        await agent.stop()
    windows.append(agent.shadow.take_window()[("centerface", "1.0.0")])
    samples = sum(w.samples for w in windows)
    assert samples >= 4 and sum(w.errors for w in windows) == 0
    assert sum(w.agreement_sum for w in windows) == pytest.approx(samples)
    assert sum(w.skipped for w in windows) > 0  # the budget turned frames away
    busy = sum(w.busy_s for w in windows)
    active_busy = sum(w.active_busy_s for w in windows)
    assert busy <= 0.2 * active_busy + agent.shadow.counts.max_sample_s + 1e-6, (busy,
                                                                                  active_busy)
    assert sink.results and {r["model"]["version"] for r in sink.results} == {"1.0.0"}
    assert agent.shadow.candidate("centerface") is None  # closed at shutdown


async def test_active_swap_while_a_shadow_runs_keeps_versions_apart(
    tmp_path: Path, models_dir: Path
) -> None:
    sink = RecordingSink()
    s = agent_settings(tmp_path, models_dir,
                       [video_camera(models_dir, "cam", "yolov8n-like")],
                       models=("yolov8n-like",), http=False, pipeline={"workers": 1},
                       model_sync={"shadow_max_slowdown": 0.5})
    agent = Agent(s, sink=sink)
    await agent.start()
    try:
        agent.shadow.swap("yolov8n-like", LoadedModel.load(
            variant(models_dir, tmp_path, "yolov8n-like", "3"), ENGINE))
        await until(lambda: agent.shadow.counts.samples >= 2, timeout=90, what="samples")
        old = agent.slots["yolov8n-like"].swap(LoadedModel.load(
            variant(models_dir, tmp_path, "yolov8n-like", "2"), ENGINE))
        assert old is not None
        n = agent.shadow.counts.samples

        def on_new() -> bool:
            return any(r["model"]["version"] == "2" for r in sink.results[-3:]) \
                and agent.shadow.counts.samples >= n + 2

        await until(on_new, timeout=90, what="samples against the new active version")
    finally:
        await agent.stop()
    win = agent.shadow.take_window()
    assert win[("yolov8n-like", "2")].version == "3"
    assert win[("yolov8n-like", "2")].samples >= 1
    assert all(w.agreement_sum == pytest.approx(w.samples) for w in win.values())
    assert {r["model"]["version"] for r in sink.results} <= {"1.0.0", "2"}
