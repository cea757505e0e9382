"""Real video sources for capture and pipeline tests.

``MjpegServer`` serves a live MJPEG stream over HTTP (``multipart/x-mixed-replace``, what many
IP cameras speak) from its own thread and event loop, so OpenCV's FFmpeg backend reads it like
a camera. It can be stopped and started again on the same port (a camera that dies and comes
back) and can stall (keep the connection open but send nothing). ``write_video`` encodes a
small real video file with OpenCV. ``RtspCamera`` runs a real RTSP server process (GStreamer's
RTSP server library, ``rtsp_server.py`` beside this file) that streams the sample clip and can
be killed, restarted and stalled.
"""

from __future__ import annotations

import asyncio
import queue
import signal
import subprocess
import threading
import time
from pathlib import Path

import cv2
import numpy as np
from aiohttp import web

from tests.support.broker import free_port


def write_video(path: Path, frames: int = 30, size: tuple[int, int] = (320, 240),
                fps: float = 30.0) -> Path:
    """Encode ``frames`` frames (a moving bar) as MPEG-4 Part 2 in ``path``."""
    w, h = size
    wr = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    assert wr.isOpened(), "OpenCV cannot write mp4v here"
    for i in range(frames):
        img = np.full((h, w, 3), 40, np.uint8)
        x = (i * 9) % (w - 20)
        img[:, x : x + 20] = (0, 255, 0)
        wr.write(img)
    wr.release()
    return path


class MjpegServer:
    """A live MJPEG-over-HTTP camera on 127.0.0.1 at ``url``."""

    def __init__(self, fps: float = 30.0, size: tuple[int, int] = (320, 240)) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/stream.mjpg"
        self.fps = fps
        self.size = size
        #: When set, connections stay open but no more frames are sent.
        self.stall = threading.Event()
        self.frames_sent = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._jpeg = self._encode()

    def _encode(self) -> bytes:
        w, h = self.size
        img = np.full((h, w, 3), 80, np.uint8)
        img[h // 4 : h // 2, w // 4 : w // 2] = (0, 0, 255)
        ok, buf = cv2.imencode(".jpg", img)
        assert ok
        return buf.tobytes()

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={"Content-Type": "multipart/x-mixed-replace; boundary=frame"})
        await resp.prepare(request)
        part = (b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: "
                + str(len(self._jpeg)).encode() + b"\r\n\r\n" + self._jpeg + b"\r\n")
        while True:
            if not self.stall.is_set():
                await resp.write(part)
                self.frames_sent += 1
            await asyncio.sleep(1.0 / self.fps)

    def start(self) -> None:
        """Serve (again) on the same port."""
        started = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            app = web.Application()
            app.router.add_get("/stream.mjpg", self._stream)
            runner = web.AppRunner(app, shutdown_timeout=0.5)
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, "127.0.0.1", self.port, reuse_address=True)
            loop.run_until_complete(site.start())
            self._runner = runner
            started.set()
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name="mjpeg-server", daemon=True)
        self._thread.start()
        assert started.wait(10), "MJPEG server did not start"

    def stop(self) -> None:
        """Close the listener and every open stream (the camera dies)."""
        if self._loop is None or self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop = None
        self._thread = None


#: The interpreter with GStreamer's Python bindings (Debian's, not the virtualenv's).
SYSTEM_PYTHON = "/usr/bin/python3"
RTSP_SERVER = Path(__file__).with_name("rtsp_server.py")
SAMPLE_CLIP = Path(__file__).resolve().parents[2] / "models" / "out" / "samples" / "bikes.mp4"


class RtspCamera:
    """A real RTSP server process (``tests/support/rtsp_server.py``) streaming a clip in a loop.

    ``kill`` is a crash (``kill -9``), ``start`` again brings it back on the same port, ``stall``
    and ``resume`` keep the sessions open but stop and restart the frames.
    """

    def __init__(self, clip: Path = SAMPLE_CLIP, port: int | None = None) -> None:
        if not clip.is_file():
            raise RuntimeError(f"{clip} is missing: run scripts/setup.sh (models/build.py)")
        probe = subprocess.run(
            [SYSTEM_PYTHON, "-c", "import gi; gi.require_version('GstRtspServer', '1.0'); "
             "from gi.repository import GstRtspServer"], capture_output=True, timeout=30)
        if probe.returncode != 0:
            raise RuntimeError(
                "GStreamer's RTSP server is not installed for /usr/bin/python3 (python3-gi, "
                "gir1.2-gst-rtsp-server-1.0, gstreamer1.0-plugins-good): run scripts/setup.sh; "
                + probe.stderr.decode(errors="replace")[-400:])
        self.clip = clip
        self.port = port or free_port()
        self.url = f"rtsp://127.0.0.1:{self.port}/cam"
        self.proc: subprocess.Popen[str] | None = None
        self._lines: queue.Queue[str] = queue.Queue()
        self._pump: threading.Thread | None = None
        self.output: list[str] = []

    def _expect(self, word: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = self._lines.get(timeout=max(0.0, left))
            except queue.Empty:
                raise AssertionError(
                    f"rtsp_server said no {word!r} in {timeout}s: {self.output[-20:]}") from None
            if line.startswith(word):
                return line
            if line == "<exit>":
                raise AssertionError(f"rtsp_server exited: {self.output[-20:]}")

    def start(self) -> None:
        """Start the server process and wait until it accepts connections."""
        proc = subprocess.Popen(
            [SYSTEM_PYTHON, str(RTSP_SERVER), "--port", str(self.port), "--clip", str(self.clip)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.proc = proc
        lines = self._lines = queue.Queue()

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                self.output.append(line.rstrip())
                lines.put(line.rstrip())
            lines.put("<exit>")

        self._pump = threading.Thread(target=pump, name="rtsp-server-out", daemon=True)
        self._pump.start()
        self._expect("ready")

    def stall(self) -> None:
        """Stop sending frames; sessions and sockets stay open."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGUSR1)
        self._expect("stalled")

    def resume(self) -> None:
        """Send frames again."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGUSR2)
        self._expect("resumed")

    def kill(self) -> None:
        """``kill -9`` the server: every connection drops at once."""
        if self.proc is not None:
            self.proc.kill()
            self._reap()

    def stop(self) -> None:
        """Stop the server cleanly."""
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self._reap()

    def _reap(self) -> None:
        """Wait for the process and its output to end, then close the pipe."""
        assert self.proc is not None
        self.proc.wait(10)
        if self._pump is not None:
            self._pump.join(10)  # the pipe is at EOF once the process is gone
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None
