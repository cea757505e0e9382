"""Real video sources for capture and pipeline tests.

``MjpegServer`` serves a live MJPEG stream over HTTP (``multipart/x-mixed-replace``, what many
IP cameras speak) from its own thread and event loop, so OpenCV's FFmpeg backend reads it like
a camera. It can be stopped and started again on the same port (a camera that dies and comes
back) and can stall (keep the connection open but send nothing). ``write_video`` encodes a
small real video file with OpenCV.
"""

from __future__ import annotations

import asyncio
import threading
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
