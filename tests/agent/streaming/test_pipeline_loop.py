"""Nothing the agent does blocks its event loop: proven with blockbuster and a lag probe.

blockbuster raises ``BlockingError`` when code in ``edge_agent`` makes a blocking call (file
or socket I/O, ``time.sleep``, a contended lock, SQLite...) on the event loop thread. The test
runs the whole agent life: start (models, measurement, sink, cameras, HTTP), frames flowing
from a real video file and a test pattern through real ORT, every HTTP endpoint including an
upload, and the graceful stop. Logs are captured in memory (writing them to a terminal or a
pipe is the one blocking write every asyncio program makes, and not the agent's doing).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import cv2
import numpy as np
import structlog
from blockbuster import blockbuster_ctx

from edge_agent.app.compose import Agent
from tests.support.pipeline import agent_settings
from tests.support.waiting import until


async def test_nothing_blocks_the_event_loop(tmp_path: Path, models_dir: Path) -> None:
    video = models_dir / "samples" / "synthetic-720p.mp4"
    cams = [
        {"name": "file", "url": str(video), "model": "yolov8-head", "loop": True},
        {"name": "pattern", "url": "test://pattern?width=320&height=240&fps=30",
         "model": "yolov8-head"},
    ]
    s = agent_settings(tmp_path, models_dir, cams, pipeline={"workers": 0, "max_batch": 0,
                                                             "calibrate_s": 0.05})
    ok, png = cv2.imencode(".png", np.full((64, 64, 3), 200, np.uint8))
    assert ok
    base = f"http://127.0.0.1:{s.http.port}"
    with structlog.testing.capture_logs() as logs, blockbuster_ctx("edge_agent"):
        agent = Agent(s)  # the default sink: the JSON-lines file
        await agent.start()
        try:
            await until(lambda: agent.pipeline is not None
                             and sum(agent.pipeline.published.values()) >= 30,
                             what="results from both cameras")
            agent.lag.reset()
            async with aiohttp.ClientSession() as http:
                for _ in range(3):
                    for path in ("/healthz", "/readyz", "/metrics", "/v1/models",
                                 "/v1/cameras"):
                        async with http.get(base + path) as r:
                            assert r.status == 200, path
                            await r.read()
                    async with http.post(base + "/v1/infer?model=yolov8-head",
                                         data=png.tobytes(),
                                         headers={"Content-Type": "image/png"}) as r:
                        assert r.status == 200
                    await asyncio.sleep(0.2)
            n = sum(agent.pipeline.published.values())  # type: ignore[union-attr]
            await until(lambda: sum(agent.pipeline.published.values()) >= n + 20,  # type: ignore[union-attr]
                             what="more results")
            lag = agent.lag.max_lag_s
        finally:
            await agent.stop()
    errors = [e for e in logs if e["log_level"] in ("error", "critical")]
    assert not errors, errors
    assert {e["event"] for e in logs} >= {"agent_started", "shutdown_done"}
    # generous for a shared 2-core machine; a blocking call shows as hundreds of ms
    assert lag < 0.25, f"event loop lagged {lag * 1000:.0f} ms"
    assert (tmp_path / "results.jsonl").read_bytes().count(b"\n") >= 50
