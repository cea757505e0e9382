"""Capture: URL parsing, real video files, real MJPEG streams that die and stall."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from edge_agent.capture.camera import Camera, Frame
from edge_agent.config import CameraSettings, parse_source
from tests.support.broker import free_port
from tests.support.streams import MjpegServer, write_video
from tests.support.waiting import wait_until


class Slot:
    """A one-frame consumer like the scheduler's: newest wins, replaced frames are dropped."""

    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.frame: Frame | None = None
        self.taken: list[Frame] = []

    def offer(self, frame: Frame, camera: Camera) -> None:
        with self.lock:
            if self.frame is not None:
                camera.dropped += 1
            self.frame = frame
            self.lock.notify_all()

    def wait_room(self, camera: Camera, timeout: float) -> bool:
        with self.lock:
            return self.lock.wait_for(lambda: self.frame is None, timeout)

    def take(self) -> Frame | None:
        with self.lock:
            f, self.frame = self.frame, None
            if f is not None:
                self.taken.append(f)
            self.lock.notify_all()
            return f


def cam(url: str, **kw: object) -> CameraSettings:
    return CameraSettings(name=str(kw.pop("name", "cam0")), url=url, model="m", **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ pure logic


@pytest.mark.parametrize(
    ("url", "kind", "target"),
    [
        ("/data/a.mp4", "file", "/data/a.mp4"),
        ("file:///data/a.mp4", "file", "/data/a.mp4"),
        ("rtsp://10.0.0.5:554/stream1", "stream", "rtsp://10.0.0.5:554/stream1"),
        ("http://cam.local/video.mjpg", "stream", "http://cam.local/video.mjpg"),
        ("usb://0", "usb", "0"),
        ("test://pattern?width=64&height=48&fps=5", "test", "pattern"),
    ],
)
def test_parse_source_accepts_every_kind(url: str, kind: str, target: str) -> None:
    spec = parse_source(url)
    assert (spec.kind, spec.target) == (kind, target)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://x/y", "unsupported source scheme 'ftp'"),
        ("usb://cam", "device index"),
        ("test://noise", "only test://pattern"),
        ("test://pattern?fps=0", "fps must be in"),
        ("test://pattern?colour=red", "unknown parameter"),
        ("rtsp:///nohost", "no host"),
        ("", "empty"),
    ],
)
def test_parse_source_rejects_with_a_clear_message(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_source(url)


# --------------------------------------------------------------------- real files


def test_file_at_max_rate_delivers_every_frame_then_ends(tmp_path: Path,
                                                         cameras: list[Camera]) -> None:
    video = write_video(tmp_path / "v.mp4", frames=25)
    slot = Slot()
    c = Camera(cam(str(video), rate="max"), slot)
    cameras.append(c)
    c.start()

    def consume() -> bool:
        slot.take()
        return c.state == "ended" and slot.frame is None

    wait_until(consume, what="file to end")
    assert c.frames_read == 25
    assert len(slot.taken) == 25 and c.dropped == 0
    assert [f.index for f in slot.taken] == list(range(25))
    f = slot.taken[0]
    assert (f.width, f.height) == (320, 240)
    assert f.image is not None and f.image.shape == (240, 320, 3)
    assert c.source_fps == pytest.approx(30.0, rel=0.01)


def test_file_at_native_rate_is_paced_and_drops_what_nobody_takes(tmp_path: Path,
                                                                  cameras: list[Camera]) -> None:
    video = write_video(tmp_path / "v.mp4", frames=15, fps=50.0)
    slot = Slot()
    c = Camera(cam(str(video)), slot)
    cameras.append(c)
    t0 = time.monotonic()
    c.start()
    wait_until(lambda: c.state == "ended", what="file to end")
    took = time.monotonic() - t0
    assert took >= 14 / 50.0 * 0.9  # played at 50 fps, not as fast as it decodes
    assert c.frames_delivered == 15 and c.dropped == 14  # nobody took: newest wins


def test_looping_file_restarts(tmp_path: Path, cameras: list[Camera]) -> None:
    video = write_video(tmp_path / "v.mp4", frames=5)
    slot = Slot()
    c = Camera(cam(str(video), rate="max", loop=True), slot)
    cameras.append(c)
    c.start()
    wait_until(lambda: (slot.take() is not None and c.frames_read > 12), what="a few loops")
    assert c.state == "connected" and c.reconnects == 0


def test_fps_cap_skips_frames(cameras: list[Camera]) -> None:
    slot = Slot()
    c = Camera(cam("test://pattern?width=64&height=48&fps=100", fps_cap=20), slot)
    cameras.append(c)
    c.start()
    wait_until(lambda: c.frames_read >= 60, what="60 frames")
    assert c.frames_skipped >= 30
    assert c.frames_delivered <= c.frames_read * 0.4


def test_missing_file_is_a_degraded_camera_not_a_crash(tmp_path: Path,
                                                      cameras: list[Camera]) -> None:
    c = Camera(cam(str(tmp_path / "nope.mp4"), reconnect_min_s=0.05, reconnect_max_s=0.1), Slot())
    cameras.append(c)
    c.start()
    wait_until(lambda: c.reconnects >= 2, what="retries")
    assert c.alive and c.state in ("reconnecting", "connecting")
    assert c.last_error is not None and "no such file" in c.last_error


def test_usb_camera_without_a_device_names_the_missing_device(cameras: list[Camera]) -> None:
    # /dev/video57 exists on no machine this runs on; OpenCV alone would only say "cannot open"
    assert not Path("/dev/video57").exists()
    c = Camera(cam("usb://57", reconnect_min_s=0.05, reconnect_max_s=0.1), Slot())
    cameras.append(c)
    c.start()
    wait_until(lambda: c.reconnects >= 2, what="retries")
    snap = c.snapshot()
    assert snap["connected"] is False and snap["state"] in ("reconnecting", "connecting")
    assert snap["last_error"].startswith("no video device /dev/video57 for usb://57")
    assert "plugged in" in snap["last_error"]


# -------------------------------------------------------------------- real streams


def test_unreachable_stream_retries_with_backoff(cameras: list[Camera]) -> None:
    url = f"http://127.0.0.1:{free_port()}/stream.mjpg"
    c = Camera(cam(url, reconnect_min_s=0.05, reconnect_max_s=0.2, open_timeout_s=2), Slot())
    cameras.append(c)
    c.start()
    wait_until(lambda: c.reconnects >= 2, what="reconnect attempts")
    snap = c.snapshot()
    assert snap["connected"] is False and snap["last_error"]
    assert snap["last_frame_age_s"] is None


@pytest.mark.slow
def test_stream_that_dies_is_reconnected_while_other_cameras_keep_going(
    cameras: list[Camera],
) -> None:
    server = MjpegServer(fps=30)
    server.start()
    try:
        s1, s2 = Slot(), Slot()
        live = Camera(cam(server.url, name="ipcam", reconnect_min_s=0.1, reconnect_max_s=0.4,
                          stall_timeout_s=2), s1)
        other = Camera(cam("test://pattern?width=64&height=48&fps=50", name="other"), s2)
        cameras += [live, other]
        live.start()
        other.start()
        wait_until(lambda: live.state == "connected" and live.frames_read > 5, what="stream up")

        server.stop()  # the camera dies
        wait_until(lambda: live.state in ("reconnecting", "connecting"), what="failure noticed")
        before = other.frames_read
        wait_until(lambda: live.reconnects >= 2 and other.frames_read > before + 10,
                 what="retries while down, the other camera still reading")
        assert live.state != "connected" and other.state == "connected"

        server.start()  # and comes back on the same address
        n = live.frames_read
        wait_until(lambda: live.state == "connected" and live.frames_read > n + 5, what="back")
        assert other.state == "connected"
    finally:
        server.stop()


@pytest.mark.slow
def test_stalled_stream_is_detected_and_reconnected(cameras: list[Camera]) -> None:
    server = MjpegServer(fps=30)
    server.start()
    try:
        c = Camera(cam(server.url, stall_timeout_s=1.0, open_timeout_s=2, reconnect_min_s=0.1,
                       reconnect_max_s=0.2), Slot())
        cameras.append(c)
        c.start()
        wait_until(lambda: c.state == "connected" and c.frames_read > 5, what="stream up")
        server.stall.set()  # connection open, no frames
        # whichever notices first, the watchdog (check_stall, called by the pipeline) or the
        # FFmpeg read timeout in the capture thread, the stall is counted once and named
        wait_until(lambda: c.check_stall() or c.stalls >= 1, timeout=5, what="stall detected")
        assert c.stalls == 1
        wait_until(lambda: c.reconnects >= 1, timeout=10, what="reconnect after stall")
        assert c.last_error is not None and c.last_error.startswith("stalled")
        server.stall.clear()
        n = c.frames_read
        wait_until(lambda: c.state == "connected" and c.frames_read > n + 3, what="flowing again")
    finally:
        server.stop()


def test_the_watchdog_names_the_stall_before_the_read_times_out() -> None:
    """The pipeline's watchdog may see the stall before the capture thread's read timeout does:
    the state it reports then says "stalled", not the error of an earlier outage."""
    c = Camera(cam("rtsp://127.0.0.1:1/cam", stall_timeout_s=2.0), Slot())  # never started
    c.last_error = "cannot open stream source rtsp://127.0.0.1:1/cam"  # the previous outage
    c.state, c.state_since = "connected", time.monotonic()  # as its first frame leaves it
    c.last_frame_at = c.state_since
    assert c.check_stall(now=c.state_since + 1.5) is False
    assert c.last_error.startswith("cannot open")  # not silent long enough yet: unchanged
    assert c.check_stall(now=c.state_since + 2.5) is True
    snap = c.snapshot()
    assert (snap["state"], snap["stalls"], snap["connected"]) == ("stalled", 1, False)
    assert snap["last_error"] == "stalled: no frame for 2.5 s"
    assert c.check_stall(now=c.state_since + 3.0) is False  # counted once
