"""A real RTSP camera: GStreamer's RTSP server process streaming the sample clip (bikes.mp4).

The agent reads it over RTSP (OpenCV's FFmpeg client), survives the server's crash and restart
and a stream that stalls with its session open, and reports the camera's state through
``/v1/cameras`` and ``/readyz`` the whole time. The server is a separate process
(``tests/support/rtsp_server.py``), killed with ``kill -9`` like a camera that loses power.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from edge_agent.app.compose import Agent
from edge_agent.capture.camera import Camera
from tests.agent.capture.test_capture import Slot, cam
from tests.support.pipeline import RecordingSink, agent_settings
from tests.support.streams import RtspCamera
from tests.support.waiting import until, wait_until

#: bikes.mp4: 640x272 H.264 at 25 fps
CLIP_SIZE = (640, 272)


@pytest.fixture
def rtsp() -> Iterator[RtspCamera]:
    server = RtspCamera()
    server.start()
    yield server
    server.stop()


def test_rtsp_camera_delivers_the_clip_at_its_size_and_rate(rtsp: RtspCamera,
                                                            cameras: list[Camera]) -> None:
    slot = Slot()
    c = Camera(cam(rtsp.url, open_timeout_s=5), slot)
    cameras.append(c)
    c.start()
    wait_until(lambda: slot.take() is not None and len(slot.taken) >= 10, timeout=20,
               what="10 frames over RTSP")
    assert c.state == "connected" and c.reconnects == 0
    f = slot.taken[-1]
    assert (f.width, f.height) == CLIP_SIZE
    assert f.image is not None and f.image.shape == (CLIP_SIZE[1], CLIP_SIZE[0], 3)
    assert f.image.std() > 10  # decoded picture content, not a grey error frame
    assert c.source_fps == pytest.approx(25.0, rel=0.05)


async def _cameras(http: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    async with http.get(f"{base}/v1/cameras") as resp:
        assert resp.status == 200
        return {c["name"]: c for c in (await resp.json())["cameras"]}


async def _ready(http: aiohttp.ClientSession, base: str) -> int:
    async with http.get(f"{base}/readyz") as resp:
        return resp.status


@pytest.mark.slow
@pytest.mark.fault
async def test_agent_survives_rtsp_server_crash_and_stall_and_reports_the_camera(
    tmp_path: Path, models_dir: Path, rtsp: RtspCamera
) -> None:
    sink = RecordingSink()
    ipcam = {"name": "ipcam", "url": rtsp.url, "model": "yolov8-head",
             "reconnect_min_s": 0.1, "reconnect_max_s": 0.5, "stall_timeout_s": 2,
             "open_timeout_s": 3}
    s = agent_settings(tmp_path, models_dir, [ipcam])
    agent = Agent(s, sink=sink)
    await agent.start()
    base = f"http://127.0.0.1:{s.http.port}"
    try:
        async with aiohttp.ClientSession() as http:
            assert agent.pipeline is not None
            camera = agent.pipeline.cameras["ipcam"]

            async def state() -> dict[str, Any]:
                return (await _cameras(http, base))["ipcam"]

            # 1. reading: results from the clip, the camera connected, the agent ready
            await until(lambda: len(sink.results) >= 10, timeout=30, what="results over RTSP")
            snap = await state()
            assert snap["state"] == "connected" and snap["connected"] is True
            assert snap["source_fps"] == pytest.approx(25.0, rel=0.05)
            assert await _ready(http, base) == 200
            assert sink.results[-1]["frame"]["width"] == CLIP_SIZE[0]

            # 2. the server crashes: the camera says so, the agent is alive but not ready
            await asyncio.to_thread(rtsp.kill)
            await until(lambda: camera.reconnects >= 2, timeout=20, what="retries while down")
            snap = await state()
            assert snap["connected"] is False and snap["state"] in ("reconnecting", "connecting")
            assert snap["last_error"]
            await until(lambda: _is(503, _ready(http, base)), timeout=10,
                        what="/readyz 503 with the only camera down")
            # 3. it comes back on the same address: the camera reconnects by itself
            down_at = len(sink.results)
            await asyncio.to_thread(rtsp.start)
            await until(lambda: len(sink.results) >= down_at + 10, timeout=30,
                        what="results again after the restart")
            assert (await state())["state"] == "connected"
            await until(lambda: _is(200, _ready(http, base)), timeout=10, what="ready again")

            # 4. the stream stalls with its session open: detected, counted, reported
            stalls = camera.stalls
            await asyncio.to_thread(rtsp.stall)
            await until(lambda: camera.stalls > stalls, timeout=15, what="stall detected")
            snap = await state()
            assert snap["connected"] is False and snap["stalls"] == stalls + 1
            assert snap["last_error"].startswith("stalled")
            stalled_at = len(sink.results)
            await asyncio.to_thread(rtsp.resume)
            await until(lambda: len(sink.results) >= stalled_at + 10, timeout=30,
                        what="results again after the stall")
            assert (await state())["state"] == "connected"
    finally:
        await agent.stop()
    seqs = [r["seq"] for r in sink.results]
    assert seqs == list(range(len(seqs)))  # one seq line across both outages
    assert agent.health() == (True, [])


async def _is(status: int, got: Any) -> bool:
    return bool(await got == status)
