"""Telemetry in: aggregation over the window, offline by last will and by silence (manual clock),
and the MQTT link against a real broker (state, telemetry, payloads that break the contract or
speak for another node)."""

from __future__ import annotations

import asyncio
import time

import orjson
from structlog.testing import capture_logs

from edge_agent.contract import protocol
from edge_agent.contract.protocol import (
    LatencySummary,
    ModelState,
    ModelTelemetry,
    StateMessage,
    TelemetryMessage,
)
from hub.config import MqttSettings, TelemetrySettings
from hub.fleet.aggregate import Sample, aggregate, combine
from hub.fleet.view import Fleet
from hub.transport.mqtt import HubMqtt
from tests.support.broker import HUB, Broker, Publishers
from tests.support.rollout_env import ManualClock
from tests.support.sim_agents import SimAgent
from tests.support.waiting import until


def _tel(node: str, version: str, frames: int, errors: int, p99: float,
         interval: float = 10.0) -> TelemetryMessage:
    return TelemetryMessage(node=node, ts=time.time(), interval_s=interval, models=[
        ModelTelemetry(name="det", version=version, frames=frames, errors=errors,
                       latency_ms=LatencySummary(p50=p99 / 2, p95=p99 * 0.9, p99=p99))])


def test_aggregate_is_frame_weighted() -> None:
    m = aggregate([Sample(0, 10, 100, 1, 10, 18, 20), Sample(10, 10, 300, 0, 20, 36, 40)])
    assert (m.frames, m.errors, m.samples) == (400, 1, 2)
    assert m.fps == 20.0
    assert m.p99_ms == (20 * 100 + 40 * 300) / 400
    assert m.error_rate == 1 / 400
    empty = aggregate([Sample(0, 10, 0, 4, 0, 0, 0)])
    assert empty.p99_ms is None and empty.error_rate == 1.0 and empty.get("fps") == 0.0
    g = combine([m, aggregate([Sample(0, 10, 100, 0, 5, 9, 10)])])
    assert g.fps == (20.0 + 10.0) / 2
    assert g.p99_ms == (35 * 400 + 10 * 100) / 500


def test_window_since_and_versions() -> None:
    clock = ManualClock(1000.0)
    f = Fleet(TelemetrySettings(window_s=60, offline_after_s=30), clock)
    f.on_telemetry("n1", _tel("n1", "1.0", 100, 0, 20))
    clock.advance(10)
    f.on_telemetry("n1", _tel("n1", "2.0", 100, 10, 60))
    assert f.metrics("n1", "det", "2.0").p99_ms == 60
    assert f.metrics("n1", "det").frames == 200
    assert f.metrics("n1", "det", exclude_version="2.0").p99_ms == 20
    assert f.metrics("n1", "det", since=1005).samples == 1
    clock.advance(55)  # the first sample left the window
    assert f.metrics("n1", "det").samples == 1
    assert f.describe("n1")["metrics"]["det@2.0"]["error_rate"] == 0.1


def test_offline_by_last_will_and_by_silence() -> None:
    clock = ManualClock(1000.0)
    woke: list[str] = []
    f = Fleet(TelemetrySettings(window_s=60, offline_after_s=30), clock,
              on_state_change=woke.append)
    assert not f.online("n1")  # never heard of
    state = StateMessage(node="n1", online=True, generation=3,
                         models=[ModelState(name="det", version="1.0", status="active")])
    f.on_state("n1", state)
    assert f.online("n1") and f.generation("n1") == 3 and woke == ["n1"]
    f.on_state("n1", StateMessage(node="n1", online=False))  # the last will
    assert not f.online("n1")
    assert f.model_state("n1", "det") == state.models[0]  # what it ran is remembered
    f.on_state("n1", state)
    clock.advance(29)
    assert f.online("n1")
    clock.advance(2)
    assert not f.online("n1")  # silence
    f.on_telemetry("n1", _tel("n1", "1.0", 10, 0, 5))
    assert f.online("n1")


async def test_hub_link_ingests_and_counts_contract_breaks(broker: Broker,
                                                          topic_prefix: str) -> None:
    fleet = Fleet(TelemetrySettings(window_s=60, offline_after_s=30))
    link = HubMqtt(MqttSettings(**broker.settings(HUB), topic_prefix=topic_prefix),
                   on_state=fleet.on_state, on_telemetry=fleet.on_telemetry,
                   on_invalid=fleet.on_invalid)
    await link.start(wait_s=10)
    agent = SimAgent(broker, topic_prefix, "n1", models={"det": "1.0"}).start()
    nodes = Publishers(broker)  # n2 publishes under its own topics, as the ACL allows
    try:
        await until(lambda: fleet.online("n1") and fleet.metrics("n1", "det", "1.0").samples >= 2)
        assert fleet.model_state("n1", "det") is not None
        lag = fleet.ingest_lag_p99()
        assert lag is not None and lag < 5
        before = fleet.invalid
        for topic, payload in (
            (protocol.telemetry_topic(topic_prefix, "n2"), b"{not json"),
            (protocol.telemetry_topic(topic_prefix, "n2"), b'{"v": 2, "node": "n2"}'),
            (protocol.state_topic(topic_prefix, "n2"),
             orjson.dumps({"v": 1, "node": "n2", "online": True, "generation": 2**53})),
            (protocol.telemetry_topic(topic_prefix, "n2"), b"x" * (300 * 1024)),
        ):
            await asyncio.to_thread(nodes.publish, topic, payload)
        await until(lambda: fleet.invalid - before == 4)
        assert "n2" not in fleet.nodes  # nothing of a broken payload was taken in
        assert link.invalid == fleet.invalid
        assert fleet.rejected["malformed"] == link.rejected["malformed"] == 4
        agent.kill()
        await until(lambda: not fleet.online("n1"))
    finally:
        nodes.close()
        agent.stop()
        await link.aclose()


async def test_a_payload_for_another_node_is_dropped_and_counted(broker: Broker,
                                                                topic_prefix: str) -> None:
    """Node n1 may publish under its own topics only; what it says there about n2 is ignored,
    counted as ``node_mismatch`` (metric and log), and n2 stays unknown."""
    fleet = Fleet(TelemetrySettings(window_s=60, offline_after_s=30))
    link = HubMqtt(MqttSettings(**broker.settings(HUB), topic_prefix=topic_prefix),
                   on_state=fleet.on_state, on_telemetry=fleet.on_telemetry,
                   on_invalid=fleet.on_invalid)
    await link.start(wait_s=10)
    nodes = Publishers(broker)
    forged_state = StateMessage(node="n2", online=True, generation=1, models=[
        ModelState(name="det", version="2.0", status="active")])
    try:
        with capture_logs() as logs:
            for topic, msg in ((protocol.state_topic(topic_prefix, "n1"), forged_state),
                               (protocol.telemetry_topic(topic_prefix, "n1"),
                                _tel("n2", "2.0", 100, 0, 1.0))):
                await asyncio.to_thread(nodes.publish, topic, protocol.encode(msg))
            await until(lambda: fleet.rejected["node_mismatch"] == 2)
        assert link.rejected == {"node_mismatch": 2}
        assert not fleet.nodes, "neither n1 nor n2 was credited with anything"
        assert any(e["event"] == "mqtt_node_mismatch" and "n2" in e["error"] for e in logs)
        # one writer per direct call too: the fleet refuses a mismatch handed to it directly
        fleet.on_state("n3", forged_state)
        assert fleet.rejected["node_mismatch"] == 3 and not fleet.nodes
    finally:
        nodes.close()
        await link.aclose()
