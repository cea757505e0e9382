"""Attacks over MQTT by someone holding one edge box: its certificate and key, used in every way
the broker lets them be used. Against the session broker (TLS, client certificates, the
production ACL rendered by ``edge_agent.contract.acl``), the real hub's control plane and real
agents. Each test is an attack that must fail.

- A node's certificate cannot publish under another node's topics (refused by the broker: the
  messages never arrive) nor read another node's desired state.
- Forged state and telemetry for other nodes, sent both ways an attacker can (under the victim's
  topics: refused by the broker; under its own topics, naming the victim in the payload: dropped
  and counted by the hub), cannot make a failing rollout succeed or a node without an agent
  count as upgraded.
- A retained state with a generation of 2^63-1, -1 or "1000000" is refused, and a node claiming
  the largest valid generation holds up nobody: the other nodes of the batch get their desired
  state.
- An agent without ``hub.url`` takes no desired state at all.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from structlog.testing import capture_logs

from edge_agent.app.compose import Agent
from edge_agent.config import MqttSettings
from edge_agent.contract import protocol
from edge_agent.contract.protocol import (
    LatencySummary,
    ModelState,
    ModelTelemetry,
    StateMessage,
    TelemetryMessage,
)
from edge_agent.transport.link import MqttLink
from hub.cluster.base import load_inventory, write_inventory
from hub.config import HubSettings
from hub.registry.service import Registry
from hub.rollouts.model import RolloutSpec
from hub.server.metrics import FleetCollector
from tests.support.broker import HUB, Broker, Publishers
from tests.support.fake_k8s import FakeKube
from tests.support.mqtt_recorder import Recorder, listen
from tests.support.pipeline import agent_settings
from tests.support.rollout_env import (
    CAM,
    LABEL,
    MODEL,
    Fleet,
    add_camera_nodes,
    control_plane,
    hub_settings,
    push_version,
)
from tests.support.sim_agents import Behaviour
from tests.support.waiting import until

NOT_AUTHORISED = 0x87


def _forged_telemetry(node: str, p99: float = 1.0) -> bytes:
    """Telemetry saying ``node`` runs both versions fast, over many frames."""
    return protocol.encode(TelemetryMessage(
        node=node, ts=0.0, interval_s=0.05, agent_version="forged",
        models=[ModelTelemetry(name=MODEL, version=v, frames=500, errors=0,
                               latency_ms=LatencySummary(p50=p99, p95=p99, p99=p99))
                for v in ("1.0", "2.0")]))


def _forged_state(node: str) -> bytes:
    """State saying ``node`` is online and serves 2.0, with any generation applied."""
    return protocol.encode(StateMessage(
        node=node, online=True, generation=1_000_000, agent_version="forged",
        models=[ModelState(name=MODEL, version="2.0", status="active")]))


# ------------------------------------------------------------------------- the broker refuses


async def test_a_node_cannot_publish_under_another_nodes_topics(
    broker: Broker, topic_prefix: str
) -> None:
    """The agent's own link, logged in as node-a, publishing for node-b: every one refused."""
    p = topic_prefix
    rec = Recorder(broker, [f"{p}/#"]).start()
    link = MqttLink(MqttSettings(**broker.settings("node-a"), topic_prefix=p), "node-a")
    await link.start()
    codes: dict[str, int] = {}
    try:
        assert await link.wait_connected(10)
        forged = [protocol.state_topic(p, "node-b"), protocol.telemetry_topic(p, "node-b"),
                  protocol.results_topic(p, "node-b", "cam0"), protocol.desired_topic(p, "node-b"),
                  protocol.desired_topic(p, "node-a"),  # nor its own desired state
                  f"{p}/node-b/events/cam0", f"{p}/node-b/zones/cam0/door"]
        for topic in [*forged, protocol.telemetry_topic(p, "node-a")]:
            assert link.publish(topic, b'{"forged": true}', token=topic,
                                on_ack=codes.__setitem__)
        await until(lambda: len(codes) == len(forged) + 1, what="every PUBACK")
        assert {t: codes[t] for t in forged} == {t: NOT_AUTHORISED for t in forged}
        assert codes[protocol.telemetry_topic(p, "node-a")] == 0
        # node-a's own message came after the forged ones on one connection: once it arrived,
        # anything the broker had let through would have too
        rec.wait(lambda: any(t == protocol.telemetry_topic(p, "node-a")
                             for t, _, _ in rec.messages), 10, "node-a's own telemetry")
        assert [t for t, _, _ in rec.messages] == [protocol.telemetry_topic(p, "node-a")]
    finally:
        await link.aclose()
        rec.stop()


async def test_a_node_cannot_read_another_nodes_desired_state(
    broker: Broker, topic_prefix: str
) -> None:
    p = topic_prefix
    got: list[str] = []
    link = MqttLink(MqttSettings(**broker.settings("node-a"), topic_prefix=p), "node-a")
    for filt in (protocol.desired_topic(p, "node-b"), f"{p}/+/desired", f"{p}/#"):
        link.subscribe(filt, lambda topic, _m: got.append(topic))
    await link.start()
    hub = Publishers(broker)
    try:
        assert await link.wait_connected(10)
        # the hub writes node-b's desired state (retained), then node-a's
        for node in ("node-b", "node-a"):
            info = await asyncio.to_thread(
                lambda n=node: hub.client(HUB).publish(protocol.desired_topic(p, n),
                                                       b"{}", qos=1, retain=True))
            await asyncio.to_thread(info.wait_for_publish, 5)
        await until(lambda: protocol.desired_topic(p, "node-a") in got, what="its own desired")
        assert set(got) == {protocol.desired_topic(p, "node-a")}
    finally:
        hub.close()
        await link.aclose()


# --------------------------------------------------------------- the hub believes no forgery


@pytest.fixture
async def registry(tmp_path: Path, models_dir: Path) -> Iterator[Registry]:
    reg = Registry(hub_settings(tmp_path / "reg", broker=None, prefix="x", inventory=tmp_path))
    for v in ("1.0", "2.0"):
        await push_version(reg, models_dir, v)
    yield reg  # type: ignore[misc]
    await reg.aclose()


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    k = FakeKube(hang_s=10).start()
    yield k
    k.stop()


class Forger:
    """The attacker's box (``mallory``): floods forged state and telemetry for ``victims``,
    under the victims' own topics and under its own, until stopped."""

    def __init__(self, nodes: Publishers, prefix: str, victims: list[str]) -> None:
        self.nodes, self.prefix, self.victims = nodes, prefix, victims
        self.codes: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="forger")

    def _run(self) -> None:
        p = self.prefix
        mallory = self.nodes.client("mallory")  # the one certificate the attacker holds
        mallory.on_publish = lambda _c, _u, _mid, rc, _p: self.codes.append(rc.value)
        while not self._stop.wait(0.02):
            for v in self.victims:
                for topic, payload in (
                    (protocol.telemetry_topic(p, v), _forged_telemetry(v)),
                    (protocol.state_topic(p, v), _forged_state(v)),
                    (protocol.telemetry_topic(p, "mallory"), _forged_telemetry(v)),
                    (protocol.state_topic(p, "mallory"), _forged_state(v)),
                ):
                    mallory.publish(topic, payload, qos=1).wait_for_publish(5)

    def __enter__(self) -> Forger:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


async def test_forged_state_and_telemetry_cannot_make_a_rollout_succeed(
    tmp_path: Path, broker: Broker, topic_prefix: str, kube: FakeKube, registry: Registry,
    nodes: Publishers,
) -> None:
    """cam-0 really runs 2.0 at 200 ms (the gate allows 80); ghost has no agent at all. The
    attacker claims both serve 2.0 at 1 ms over 500 frames per message: the gate still sees
    cam-0's 200 ms and rolls back, ghost is never counted as upgraded, and every forgery the
    broker let through (under mallory's own topics) is dropped and counted on /metrics."""
    settings: HubSettings = hub_settings(
        tmp_path / "data", broker=broker, prefix=topic_prefix,
        kubeconfig=kube.write_kubeconfig(tmp_path / "kubeconfig"))
    add_camera_nodes(kube, ["cam-0", "ghost"], site="a")
    add_camera_nodes(kube, ["mallory"], site="b")
    fleet = Fleet(broker, topic_prefix)
    fleet.add("cam-0", behaviour=Behaviour(latency_ms={"1.0": 20.0, "2.0": 200.0}))
    cp = await control_plane(settings, registry)
    try:
        with capture_logs() as logs, Forger(nodes, topic_prefix, ["cam-0", "ghost"]) as forger:
            await until(lambda: cp.fleet.online("cam-0") and len(forger.codes) > 8)
            r = await cp.controller.create(RolloutSpec.model_validate({
                "model": MODEL, "version": "2.0", "selector": "site=a", "canary": 0,
                "waves": [100], "bake_s": 0.5, "gates": ["p99_ms<=80"], "deadline_s": 10,
                "min_samples": 2}))
            ro = cp.controller.rollouts[r["id"]]
            await until(lambda: ro.state == "rolled_back", 30, "the rollback")
        assert ro.cause is not None and ro.cause["reason"] == "gate"
        assert ro.cause["metric"] == "p99_ms" and ro.cause["value"] == pytest.approx(200, rel=0.05)
        assert ro.nodes["ghost"].status == "skipped"  # never "active": it has no agent
        assert not cp.fleet.online("ghost") and cp.fleet.model_state("ghost", MODEL) is None
        assert "mallory" not in cp.fleet.nodes, "a payload naming cam-0 was filed as mallory's"
        # under the victims' topics the broker refused; under mallory's the hub dropped them
        assert NOT_AUTHORISED in forger.codes and 0 in forger.codes
        # the link counts in paho's thread, the fleet on the loop: the same once both caught up
        await until(lambda: cp.mqtt.rejected["node_mismatch"] == cp.fleet.rejected[
            "node_mismatch"], what="both counters")
        dropped = cp.fleet.rejected["node_mismatch"]
        assert dropped >= 4
        assert any(e["event"] == "mqtt_node_mismatch" for e in logs)
        reg = CollectorRegistry()
        reg.register(FleetCollector(cp))
        text = generate_latest(reg).decode()
        assert f'edge_hub_invalid_payloads_total{{reason="node_mismatch"}} {dropped:.1f}' in text
    finally:
        fleet.stop()
        await cp.aclose()


# ----------------------------------------------------------------------------- generations


@pytest.mark.parametrize("generation", [2**63 - 1, -1, "1000000", 2**53, 1.5, True])
def test_a_generation_outside_the_contract_is_refused_by_agents_and_hub(
    generation: object,
) -> None:
    state = orjson.dumps({"v": 1, "node": "n1", "online": True, "generation": generation})
    desired = orjson.dumps({"v": 1, "node": "n1", "generation": generation, "models": {}})
    for decode, payload in ((protocol.decode_state, state), (protocol.decode_desired, desired)):
        with pytest.raises(protocol.ProtocolError, match=r"generation: .*\[0, 2\^53\)"):
            decode(payload)


async def test_bad_generations_are_refused_and_other_nodes_keep_receiving_desired_state(
    tmp_path: Path, broker: Broker, topic_prefix: str, registry: Registry, nodes: Publishers,
) -> None:
    p = topic_prefix
    inv = tmp_path / "inventory.yaml"
    good = ["n1", "n2", "n3"]
    write_inventory(inv, {n: {CAM: "true"} for n in [*good, "evil"]})
    settings = hub_settings(tmp_path / "data", broker=broker, prefix=p, inventory=inv)
    got: list[tuple[str, int]] = []
    rec = listen(broker, f"{p}/+/desired", lambda _c, _u, m: got.append(
        (m.topic.split("/")[1], protocol.decode_desired(m.payload).generation)))
    cp = await control_plane(settings, registry)
    try:
        # evil's own retained state, three ways out of range: each refused, none taken in
        for bad in (2**63 - 1, -1, "1000000"):
            payload = orjson.dumps({"v": 1, "node": "evil", "online": True, "generation": bad})
            await asyncio.to_thread(nodes.publish, protocol.state_topic(p, "evil"), payload,
                                    retain=True)
        await until(lambda: cp.fleet.rejected["malformed"] == 3, what="three refusals")
        assert cp.fleet.generation("evil") == 0 and "evil" not in cp.fleet.nodes
        # the largest generation the contract allows: taken, but nothing newer can follow it
        top = protocol.MAX_GENERATION - 1
        state = protocol.encode(StateMessage(node="evil", online=True, generation=top))
        await asyncio.to_thread(nodes.publish, protocol.state_topic(p, "evil"), state,
                                retain=True)
        await until(lambda: cp.fleet.generation("evil") == top)
        with capture_logs() as logs:
            raw = load_inventory(inv)
            for n in raw:
                raw[n][LABEL] = "1.0"
            write_inventory(inv, raw)  # one edit: all four nodes in one batch
            await until(lambda: {n for n, _ in got} == set(good), what="the good nodes")
            await until(lambda: cp.dispatcher.failed == 1)
        assert sorted(got) == [(n, 1) for n in good]
        assert cp.dispatcher.desired("evil") is None
        await until(lambda: cp.dispatcher.all_published(good), what="the broker's acks")
        failed = [e for e in logs if e["event"] == "desired_node_failed"]
        assert [e["node"] for e in failed] == ["evil"] and "2^53" in failed[0]["error"]
    finally:
        await cp.aclose()
        rec.disconnect()
        rec.loop_stop()


# ------------------------------------------------------------------------- an agent, no hub


@pytest.mark.parametrize("hub_url", [None, "https://hub.test:8081"])
async def test_without_hub_url_no_desired_state_is_taken(
    tmp_path: Path, models_dir: Path, broker: Broker, topic_prefix: str, nodes: Publishers,
    hub_url: str | None,
) -> None:
    """The hub's retained desired state for the node is there before the agent starts and a
    second one comes while it runs. Without ``hub.url`` the agent never subscribes, so neither
    reaches it (with one, both do: the control that the test can see it)."""
    p = topic_prefix
    s = agent_settings(
        tmp_path, models_dir,
        [{"name": "cam0", "url": "test://pattern?width=64&height=48&fps=5",
          "model": "yolov8-head"}],
        http=False, pipeline={"sink": "mqtt"},
        mqtt={**broker.settings("test-node"), "topic_prefix": p},
        outbox={"path": str(tmp_path / "outbox.sqlite3")},
        hub={"url": hub_url, "cache_dir": str(tmp_path / "cache")},
    )
    entry = {"version": "9", "sha256": "a" * 64, "url": "https://evil.test/m.onnx",
             "manifest_url": "https://evil.test/m.json"}
    desired = protocol.desired_topic(p, "test-node")
    hub = nodes.client(HUB)
    hub.publish(desired, orjson.dumps({"v": 1, "node": "test-node", "generation": 1,
                                       "models": {"yolov8-head": entry}}),
                qos=1, retain=True).wait_for_publish(5)
    watcher = Recorder(broker, [desired, protocol.state_topic(p, "test-node")]).start()
    agent = Agent(s)
    await agent.start()
    try:
        await asyncio.to_thread(watcher.wait, lambda: any(
            t.endswith("/state") and protocol.decode_state(m).online
            for t, m, _ in watcher.messages), 20, "the agent online")
        info = hub.publish(desired, orjson.dumps({"v": 1, "node": "test-node", "generation": 2,
                                                  "models": {"yolov8-head": entry}}), qos=1)
        await asyncio.to_thread(info.wait_for_publish, 5)
        await asyncio.to_thread(watcher.wait, lambda: sum(
            t == desired for t, _, _ in watcher.messages) == 2, 10, "both desired messages")
        sync = agent.sync
        assert sync is not None
        if hub_url is None:
            # the broker delivers to every subscriber at once; the watcher has both by now
            await until(lambda: watcher.count() >= 3)
            assert sync.counters["desired_received"] == 0
            assert agent.mqtt is not None and agent.mqtt.link.stats.received == 0
            assert agent.slots["yolov8-head"].version != "9"
        else:
            await until(lambda: sync.counters["desired_received"] == 2, what="both taken")
    finally:
        await agent.stop()
        watcher.stop()
