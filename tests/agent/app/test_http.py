"""The agent's HTTP endpoints on a real server: probes, metrics, state, uploads."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import cv2
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge_agent.app.compose import Agent
from tests.support.broker import free_port
from tests.support.pipeline import RecordingSink, agent_settings
from tests.support.streams import MjpegServer
from tests.support.waiting import until

PATTERN = "test://pattern?width=320&height=240&fps=20"


def _png(w: int = 200, h: int = 120) -> bytes:
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2] = (0, 0, 255)
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


@pytest.fixture
async def running(tmp_path: Path, models_dir: Path) -> AsyncIterator[tuple[Agent, str]]:
    s = agent_settings(
        tmp_path, models_dir,
        [{"name": "cam-a", "url": PATTERN, "model": "yolov8-head"}],
        models=("yolov8-head", "tiny-classifier"),
        http={"host": "127.0.0.1", "port": free_port(), "max_upload_bytes": 64 * 1024},
    )
    agent = Agent(s, sink=RecordingSink())
    await agent.start()
    try:
        yield agent, f"http://127.0.0.1:{s.http.port}"
    finally:
        await agent.stop()


async def _get(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.get(url) as r:
        ctype = r.headers.get("Content-Type", "")
        return r.status, (await r.json() if "json" in ctype else await r.text())


async def test_probes_models_and_cameras(running: tuple[Agent, str]) -> None:
    _, base = running

    async def ready() -> bool:
        return (await _get(base + "/readyz"))[0] == 200

    await until(ready, what="ready")
    status, body = await _get(base + "/healthz")
    assert status == 200 and body == {"status": "ok", "reasons": []}
    status, body = await _get(base + "/v1/models")
    assert status == 200
    by_name = {m["name"]: m for m in body["models"]}
    assert by_name["yolov8-head"]["status"] == "active"
    assert by_name["yolov8-head"]["version"] == "1.0.0"
    assert by_name["yolov8-head"]["providers"] == ["cpu"]
    assert by_name["tiny-classifier"]["task"] == "classification"
    status, body = await _get(base + "/v1/cameras")
    assert status == 200
    (cam,) = body["cameras"]
    assert cam["name"] == "cam-a" and cam["connected"] is True and cam["frames_read"] > 0
    status, body = await _get(base + "/nope")
    assert status == 404 and body["error"]["code"] == "not_found"


async def test_metrics_parse_and_carry_per_model_stage_histograms(
    running: tuple[Agent, str],
) -> None:
    agent, base = running
    await until(lambda: agent.pipeline is not None
                     and sum(agent.pipeline.published.values()) >= 5, what="results")
    status, text = await _get(base + "/metrics")
    assert status == 200
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    stage = fams["edge_agent_stage_seconds"]
    counts = {(s.labels["model"], s.labels["version"], s.labels["stage"]): s.value
              for s in stage.samples if s.name.endswith("_count")}
    for st in ("capture_to_start", "preprocess", "inference", "postprocess", "end_to_end"):
        assert counts[("yolov8-head", "1.0.0", st)] >= 5
    fps = {s.labels["camera"]: s.value for s in fams["edge_agent_camera_fps"].samples}
    assert fps["cam-a"] > 0
    states = {(s.labels["camera"], s.labels["state"]): s.value
              for s in fams["edge_agent_camera_state"].samples}
    assert states[("cam-a", "connected")] == 1.0 and states[("cam-a", "stalled")] == 0.0
    assert "edge_agent_camera_frames_dropped" in fams
    fallbacks = {(s.labels["provider"], s.labels["reason"]): s.value
                 for s in fams["edge_agent_provider_fallbacks"].samples
                 if s.name.endswith("_total")}
    assert fallbacks.get(("cuda", "unavailable"), 0) >= 1  # CPU-only onnxruntime here
    info = fams["edge_agent_model_info"].samples
    assert {s.labels["model"] for s in info} == {"yolov8-head", "tiny-classifier"}


async def test_infer_returns_a_result_for_an_uploaded_image(running: tuple[Agent, str]) -> None:
    _, base = running
    async with aiohttp.ClientSession() as http:
        async with http.post(base + "/v1/infer?model=tiny-classifier", data=_png(),
                             headers={"Content-Type": "image/png"}) as r:
            assert r.status == 200
            body = await r.json()
        assert body["model"] == {"name": "tiny-classifier", "version": "1.0.0"}
        assert body["frame"] == {"width": 200, "height": 120}
        assert body["classes"] and body["latency_ms"]["inference"] > 0
        form = aiohttp.FormData()
        form.add_field("image", _png(), filename="x.png", content_type="image/png")
        async with http.post(base + "/v1/infer?model=yolov8-head", data=form) as r:
            assert r.status == 200
            assert (await r.json())["detections"]


@pytest.mark.parametrize(
    ("body", "headers", "query", "status", "code"),
    [
        (b"\0" * (64 * 1024 + 1), {"Content-Type": "image/png"}, "model=yolov8-head", 413,
         "too_large"),
        (b"this is not an image", {"Content-Type": "image/jpeg"}, "model=yolov8-head", 415,
         "unsupported_image"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", {"Content-Type": "image/jpeg"}, "model=yolov8-head",
         400, "invalid_image"),  # a JPEG cut off before its frame header
        (b"II*\x00" + b"\x00" * 64, {"Content-Type": "image/tiff"}, "model=yolov8-head", 415,
         "unsupported_image"),  # TIFF: OpenCV would decode it; its size is not read first
        (b'{"a": 1}', {"Content-Type": "application/json"}, "model=yolov8-head", 415,
         "unsupported_media_type"),
        (b"", {"Content-Type": "image/png"}, "model=yolov8-head", 400, "empty_body"),
        (None, {"Content-Type": "image/png"}, "model=nope", 404, "unknown_model"),
        (None, {"Content-Type": "image/png"}, "", 404, "unknown_model"),  # two models: say which
    ],
)
async def test_infer_rejects_bad_uploads_with_a_json_4xx(
    running: tuple[Agent, str], body: bytes | None, headers: dict[str, str], query: str,
    status: int, code: str,
) -> None:
    _, base = running
    data = _png() if body is None else body
    async with aiohttp.ClientSession() as http, \
            http.post(f"{base}/v1/infer?{query}", data=data, headers=headers) as r:
        assert r.status == status
        assert r.headers["Content-Type"].startswith("application/json")
        err = (await r.json())["error"]
        assert err["code"] == code and err["message"]


async def test_oversize_chunked_upload_is_rejected(running: tuple[Agent, str]) -> None:
    _, base = running

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b"\xff" * 8192  # 160 KiB, no Content-Length

    async with aiohttp.ClientSession() as http, \
            http.post(base + "/v1/infer?model=yolov8-head", data=chunks(),
                      headers={"Content-Type": "image/jpeg"}) as r:
        assert r.status == 413
        assert (await r.json())["error"]["code"] == "too_large"


@pytest.mark.slow
async def test_readyz_follows_the_camera(tmp_path: Path, models_dir: Path) -> None:
    server = MjpegServer(fps=25)
    server.start()
    cam = {"name": "ipcam", "url": server.url, "model": "yolov8-head",
           "reconnect_min_s": 0.1, "reconnect_max_s": 0.3, "stall_timeout_s": 1,
           "open_timeout_s": 1}
    s = agent_settings(tmp_path, models_dir, [cam], pipeline={"ready_frame_age_s": 1.0})
    agent = Agent(s, sink=RecordingSink())
    base = f"http://127.0.0.1:{s.http.port}"

    async def readyz() -> int:
        return (await _get(base + "/readyz"))[0]

    try:
        await agent.start()

        async def is_(code: int) -> bool:
            return await readyz() == code

        await until(lambda: is_(200), what="ready with the camera up")
        server.stall.set()  # the camera goes silent
        await until(lambda: is_(503), what="not ready once the camera is silent")
        _, body = await _get(base + "/readyz")
        assert "no camera delivers frames" in body["reasons"]
        assert (await _get(base + "/healthz"))[0] == 200  # not ready, but alive
        server.stall.clear()
        await until(lambda: is_(200), timeout=20, what="ready again")
    finally:
        await agent.stop()
        server.stop()


async def test_readyz_is_503_until_a_camera_delivers(tmp_path: Path, models_dir: Path) -> None:
    dead = {"name": "dead", "url": f"http://127.0.0.1:{free_port()}/x.mjpg",
            "model": "yolov8-head", "reconnect_min_s": 0.05, "reconnect_max_s": 0.1}
    s = agent_settings(tmp_path, models_dir, [dead])
    agent = Agent(s, sink=RecordingSink())
    await agent.start()
    try:
        status, body = await _get(f"http://127.0.0.1:{s.http.port}/readyz")
        assert status == 503 and body["status"] == "not_ready"
        assert body["reasons"] == ["no camera delivers frames"]
        status, _ = await _get(f"http://127.0.0.1:{s.http.port}/healthz")
        assert status == 200
    finally:
        await agent.stop()
    assert agent.readiness()[0] is False
