"""Motion gating: the detector, the keep-alive, the config, a camera on a scripted clip, and the
real agent with a real model (results, /metrics, telemetry)."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from edge_agent.app.compose import Agent
from edge_agent.capture.camera import Camera, Frame
from edge_agent.capture.motion import MotionDetector, MotionGate
from edge_agent.config import CameraSettings, ConfigError, load_settings
from edge_agent.config.motion import MotionSettings
from tests.agent.capture.motion_clip import SIGN_MASK, default_script, write_clip
from tests.support.pipeline import RecordingSink, agent_settings
from tests.support.waiting import until, wait_until

# ----------------------------------------------------------------------------- the detector


def scene(seed: int = 1, size: tuple[int, int] = (240, 320)) -> np.ndarray:
    """A textured still scene (BGR)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (size[0] // 8, size[1] // 8, 3), dtype=np.uint8)
    return np.repeat(np.repeat(small, 8, axis=0), 8, axis=1)


def with_box(img: np.ndarray, x: int, y: int, size: int = 40) -> np.ndarray:
    out = img.copy()
    out[y : y + size, x : x + size] = (255, 255, 255)
    out[y + size // 4 : y + size * 3 // 4, x + size // 4 : x + size * 3 // 4] = (0, 0, 0)
    return out


def noisy(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(img + rng.normal(0, 2.0, img.shape), 0, 255).astype(np.uint8)


def test_still_noisy_frames_are_not_motion_and_a_moving_box_is_at_its_first_step() -> None:
    rng = np.random.default_rng(3)
    det = MotionDetector(MotionSettings(enabled=True))
    base = with_box(scene(), 100, 100)
    assert det.detect(noisy(base, rng))  # nothing to compare with yet: counts as motion
    assert not any(det.detect(noisy(base, rng)) for _ in range(20))  # sensor noise only
    assert det.detect(noisy(with_box(scene(), 106, 100), rng))  # one step of 6 px (1.5 px small)
    assert det.last_area > 0.002


def test_a_box_that_stops_leaves_the_background_within_a_few_frames() -> None:
    det = MotionDetector(MotionSettings(enabled=True))
    for x in range(60, 120, 6):
        det.detect(with_box(scene(), x, 100))
    stopped = with_box(scene(), 120, 100)
    tail = list(itertools.takewhile(lambda _: det.detect(stopped), range(30)))
    assert len(tail) <= 4, f"still counted as motion {len(tail)} frames after stopping"


def test_motion_inside_a_mask_is_ignored_and_outside_it_counts() -> None:
    mask = [[0.0, 0.0], [0.5, 0.0], [0.5, 1.0], [0.0, 1.0]]  # the left half
    det = MotionDetector(MotionSettings(enabled=True, masks=[mask]))
    det.detect(with_box(scene(), 40, 100))
    # a box flashing right at the mask's edge (x up to 150 of 320) must not bleed across it
    assert not det.detect(with_box(scene(), 110, 100))
    assert not det.detect(with_box(scene(), 40, 160))
    assert det.detect(with_box(scene(), 220, 100))


def test_min_area_is_a_fraction_of_the_unmasked_frame() -> None:
    small = MotionDetector(MotionSettings(enabled=True, min_area=0.002))
    big = MotionDetector(MotionSettings(enabled=True, min_area=0.2))
    before, after = scene(), with_box(scene(), 100, 100, size=24)
    for det in (small, big):
        det.detect(before)
    assert small.detect(after)
    assert not big.detect(after)  # 24x24 of 320x240 is far below 20 %


def test_keepalive_lets_a_still_frame_through_every_interval_on_the_callers_clock() -> None:
    gate = MotionGate(MotionSettings(enabled=True, keepalive_s=1.0))
    img = scene()
    decisions = [gate.check(img, i / 10) for i in range(31)]  # 3 s at 10 fps
    through = [i for i, d in enumerate(decisions) if d != "still"]
    assert through == [0, 10, 20, 30]
    assert decisions[0] == "motion" and decisions[10] == "keepalive"
    assert (gate.motion, gate.keepalives, gate.still) == (1, 3, 27)
    assert gate.check(img, 0.5) == "keepalive"  # the clock went back (a file looped)


def test_a_frame_size_change_starts_a_new_background() -> None:
    det = MotionDetector(MotionSettings(enabled=True))
    det.detect(scene())
    assert not det.detect(scene())
    assert det.detect(scene(size=(120, 160)))  # a camera that reconnected at another size
    assert not det.detect(scene(size=(120, 160)))


# ----------------------------------------------------------------------------- the config


@pytest.mark.parametrize(
    ("motion", "field", "message"),
    [
        ({"masks": [[[0.1, 0.1], [0.2, 0.2]]]}, "cameras.0.motion.masks", "mask 0 has 2 corners"),
        ({"masks": [[[0.1, 0.1], [1.5, 0.2], [0.3, 0.9]]]}, "cameras.0.motion.masks",
         "mask 0 corner 1 [1.5, 0.2] is outside the frame"),
        ({"masks": [[[0.1, 0.1, 0.3]]]}, "cameras.0.motion.masks.0.0", "at most 2 items"),
        ({"masks": [[[0.1, 0.1], [0.2, 0.2], [0.3, 0.3]]]}, "cameras.0.motion.masks",
         "mask 0 has no area"),
        ({"min_area": 0}, "cameras.0.motion.min_area", "greater than 0"),
        ({"keepalive_s": -1}, "cameras.0.motion.keepalive_s", "greater than 0"),
        ({"threshold": 300}, "cameras.0.motion.threshold", "less than or equal to 255"),
        ({"sensitivity": 3}, "cameras.0.motion.sensitivity", "unknown key"),
    ],
)
def test_bad_motion_settings_name_the_field(motion: dict[str, Any], field: str,
                                            message: str) -> None:
    cam = {"name": "cam0", "url": "test://pattern", "model": "m", "motion": motion}
    with pytest.raises(ConfigError) as err:
        load_settings(None, node="n", models=[{"name": "m", "manifest": "/x.json"}],
                      cameras=[cam])
    fields = {f: m for f, m, _ in err.value.errors}
    assert field in fields, fields
    assert message in fields[field]


def test_motion_is_off_by_default_and_a_valid_section_loads() -> None:
    assert not CameraSettings(name="c", url="test://pattern", model="m").motion.enabled
    cs = CameraSettings(name="c", url="test://pattern", model="m",
                        motion={"enabled": True, "masks": [SIGN_MASK]})
    assert cs.motion.enabled and len(cs.motion.masks[0]) == 4


# ----------------------------------------------------------------------------- a camera


class Recorder:
    """A consumer that takes every frame at once (``rate: max`` then drops nothing)."""

    def __init__(self) -> None:
        self.indices: list[int] = []
        self.lock = threading.Lock()

    def offer(self, frame: Frame[Any], camera: Camera) -> None:
        with self.lock:
            self.indices.append(frame.index)

    def wait_room(self, camera: Camera, timeout: float) -> bool:
        return True


def test_camera_on_a_clip_still_80_percent_cuts_frames_and_catches_every_start(
        tmp_path: Path, cameras: list[Camera]) -> None:
    frames, keepalive_s = 300, 1.0
    clip = write_clip(tmp_path / "clip.mp4", frames, moves=default_script(frames))
    assert clip.still_fraction == pytest.approx(0.8)
    rec = Recorder()
    cs = CameraSettings(name="cam0", url=str(clip.path), model="m", rate="max",
                        motion={"enabled": True, "keepalive_s": keepalive_s,
                                "masks": [SIGN_MASK]})
    cam = Camera(cs, rec)
    cameras.append(cam)
    cam.start()
    wait_until(lambda: cam.state == "ended", 30, "the clip's end")
    inferred = rec.indices
    assert cam.frames_read == frames
    assert cam.frames_still == frames - len(inferred) == cam.motion.still  # type: ignore[union-attr]
    assert 1 - len(inferred) / frames >= 0.70, f"{len(inferred)} of {frames} frames went through"
    for start in clip.starts:
        first = min(i for i in inferred if i >= start)
        assert first - start <= 2, f"motion starting at frame {start} first inferred at {first}"
    gaps = [b - a for a, b in itertools.pairwise(inferred)]
    assert max(gaps) <= round(keepalive_s * clip.fps)
    assert cam.motion is not None and cam.motion.keepalives >= 1  # still stretches were re-checked
    snap = cam.snapshot()
    assert snap["motion_gating"] is True and snap["frames_still"] == cam.frames_still


def test_without_the_mask_the_blinking_sign_keeps_the_model_busy(
        tmp_path: Path, cameras: list[Camera]) -> None:
    clip = write_clip(tmp_path / "clip.mp4", 60, moves=[])
    rec = Recorder()
    cs = CameraSettings(name="cam0", url=str(clip.path), model="m", rate="max",
                        motion={"enabled": True})
    cam = Camera(cs, rec)
    cameras.append(cam)
    cam.start()
    wait_until(lambda: cam.state == "ended", 30, "the clip's end")
    assert len(rec.indices) >= 20  # every blink (each 5 frames) and its tail


# ----------------------------------------------------------------------------- the agent


async def test_agent_with_a_real_model_infers_only_gated_frames_and_reports_still_ones(
        tmp_path: Path, models_dir: Path) -> None:
    frames = 150
    clip = write_clip(tmp_path / "clip.mp4", frames, moves=default_script(frames))
    s = agent_settings(
        tmp_path, models_dir,
        [{"name": "gated", "url": str(clip.path), "model": "yolov8n-like", "rate": "max",
          "motion": {"enabled": True, "keepalive_s": 1.0, "masks": [SIGN_MASK]}},
         {"name": "plain", "url": str(clip.path), "model": "yolov8n-like", "rate": "max"}],
        models=("yolov8n-like",), pipeline={"workers": 1})
    sink = RecordingSink()
    agent = Agent(s, sink=sink)
    await agent.start()
    try:
        assert agent.pipeline is not None
        cams = agent.pipeline.cameras
        await until(lambda: all(c.state == "ended" for c in cams.values()), 60, "both clips")
        gated, plain = cams["gated"], cams["plain"]
        await until(lambda: len(sink.by_camera("gated")) == frames - gated.frames_still
                    and len(sink.by_camera("plain")) == frames, 30, "every result")
        assert gated.frames_still >= 0.7 * frames
        assert plain.frames_still == 0
        async with aiohttp.ClientSession() as http, \
                http.get(f"http://127.0.0.1:{s.http.port}/metrics") as r:
            text = await r.text()
        assert f'edge_agent_camera_frames_still_total{{camera="gated"}} {gated.frames_still}.0' \
            in text
        assert 'edge_agent_camera_frames_still_total{camera="plain"}' not in text
        assert 'edge_agent_camera_motion_keepalives_total{camera="gated"}' in text
        tele = {c.camera: c for c in agent.pipeline.telemetry_cameras()}
        assert tele["gated"].frames_still == gated.frames_still
        assert tele["plain"].frames_still == 0
        assert agent.pipeline.telemetry_cameras()[0].frames_still == 0  # a window, not a total
    finally:
        await agent.stop()
