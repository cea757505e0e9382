"""The composed agent with ``pipeline.sink: mqtt``: results through the outbox to a real broker."""

from __future__ import annotations

import asyncio
from pathlib import Path

from edge_agent.app.compose import Agent
from edge_agent.contract.protocol import (
    decode_result,
    decode_state,
    decode_telemetry,
    results_filter,
    state_topic,
    telemetry_topic,
)
from tests.support.broker import Broker
from tests.support.mqtt_recorder import Recorder
from tests.support.pipeline import agent_settings


async def test_results_telemetry_and_state_reach_the_broker(
    tmp_path: Path, models_dir: Path, broker: Broker, topic_prefix: str
) -> None:
    cams = [{"name": f"cam-{i}", "url": "test://pattern?width=320&height=240&fps=25",
             "model": "yolov8-head"} for i in range(2)]
    s = agent_settings(
        tmp_path, models_dir, cams, http=False,
        pipeline={"sink": "mqtt"},
        mqtt={**broker.settings("test-node"), "topic_prefix": topic_prefix,
              "telemetry_interval_s": 0.5},
        outbox={"path": str(tmp_path / "outbox.sqlite3"), "commit_interval_ms": 20},
    )
    node = s.node
    rec = await asyncio.to_thread(
        Recorder(broker, [results_filter(topic_prefix), telemetry_topic(topic_prefix, node),
                               state_topic(topic_prefix, node)]).start)
    agent = Agent(s)
    await agent.start()
    try:
        def enough() -> bool:
            topics = [t for t, _, _ in rec.messages]
            return (sum("/results/" in t for t in topics) >= 20
                    and any(t.endswith("/telemetry") for t in topics)
                    and any(t.endswith("/state") for t in topics))

        await asyncio.to_thread(rec.wait, enough, 30, "results, telemetry and state")
    finally:
        await agent.stop()
        await asyncio.to_thread(rec.stop)
    results = [decode_result(p) for t, p, _ in rec.messages if "/results/" in t]
    for cam in ("cam-0", "cam-1"):
        seqs = [r.seq for r in results if r.camera == cam]
        assert seqs and seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    tele = [decode_telemetry(p) for t, p, _ in rec.messages if t.endswith("/telemetry")]
    assert any(m.frames > 0 and m.latency_ms.p50 > 0 for t in tele for m in t.models)
    assert {c.camera for c in tele[-1].cameras} == {"cam-0", "cam-1"}
    states = [decode_state(p) for t, p, _ in rec.messages if t.endswith("/state")]
    assert states[0].online and states[0].models[0].name == "yolov8-head"
    assert states[-1].online is False  # the graceful stop publishes offline
