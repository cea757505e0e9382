"""A bootstrapped agent renews its certificate while it runs, and nothing is lost.

Everything real but the Kubernetes API: a Mosquitto broker that requires client certificates
from the hub's CA and confines each node to its own topics (``tests.support.broker``), the hub
on HTTPS signing for pods the fake API server vouches for, and a composed agent with two test
cameras, its durable outbox and its MQTT link. The agent gets its certificate at start, then
renews it (``renew_now``, the code path the due time takes): the link disconnects cleanly and
connects again with the new certificate, the results produced meanwhile wait in the outbox,
and a subscriber sees every seq of every camera with no offline state in between.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edge_agent import config as agent_config
from edge_agent.app.compose import Agent
from edge_agent.contract.protocol import decode_result, decode_state, results_filter, state_topic
from edge_agent.identity import files
from edge_agent.transport.link import MqttLink
from hub.api import pki as api_pki
from tests.support.bootstrap import agent_pod, hub_settings
from tests.support.broker import Broker
from tests.support.fake_k8s import FakeKube
from tests.support.hub_client import default_pki, running_hub
from tests.support.mqtt_recorder import Recorder
from tests.support.pipeline import agent_settings
from tests.support.waiting import until


@pytest.fixture
def fleet_broker(tmp_path: Path) -> Iterator[Broker]:
    """A broker that trusts the hub's CA (the one bootstrapped certificates come from)."""
    (tmp_path / "broker").mkdir()
    b = Broker(tmp_path / "broker", pki=default_pki())
    b.start()
    yield b
    b.stop()


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    k = FakeKube().start()
    yield k
    k.stop()


async def test_a_renewal_keeps_the_agent_connected_and_loses_no_result(
        tmp_path: Path, models_dir: Path, fleet_broker: Broker, kube: FakeKube,
        topic_prefix: str) -> None:
    pod = agent_pod(kube, tmp_path / "pod", "node-x")
    ca_file = str(default_pki().ca_file)
    ident = tmp_path / "identity"
    cams = [{"name": f"cam-{i}", "url": "test://pattern?width=320&height=240&fps=25",
             "model": "yolov8-head"} for i in range(2)]
    async with running_hub(hub_settings(tmp_path, kube, fleet_broker)) as hub:
        s = agent_settings(
            tmp_path, models_dir, cams, http=False, node="node-x",
            pipeline={"sink": "mqtt"},
            mqtt={"host": "127.0.0.1", "port": fleet_broker.port, "tls": True,
                  "ca_file": ca_file, "cert_file": str(ident / "tls.crt"),
                  "key_file": str(ident / "tls.key"), "topic_prefix": topic_prefix},
            hub={"url": hub.url, "ca_file": ca_file, "cache_dir": str(tmp_path / "cache")},
            identity={"bootstrap": True, "token_file": str(pod.token_file)},
            outbox={"path": str(tmp_path / "outbox.sqlite3"), "commit_interval_ms": 20},
        )
        rec = await asyncio.to_thread(Recorder(fleet_broker, [
            results_filter(topic_prefix), state_topic(topic_prefix, "node-x")]).start)
        agent = Agent(s)
        await agent.start()
        try:
            assert agent.identity is not None and agent.mqtt is not None
            link = agent.mqtt.link
            first = agent.identity.held
            assert first is not None and first.node == "node-x"

            def results() -> int:
                return sum("/results/" in t for t, _, _ in rec.messages)

            await asyncio.to_thread(rec.wait, lambda: results() >= 20, 30, "first results")
            assert link.stats.connects == 1
            agent.identity.renew_now()
            await until(lambda: link.stats.connects == 2 and link.connected, 30,
                        "the link connected again")
            second = agent.identity.held
            assert second is not None and second.serial != first.serial
            assert files.Held.load(ident / "tls.crt", ident / "tls.key") == second
            after = results()
            await asyncio.to_thread(rec.wait, lambda: results() >= after + 20, 30,
                                    "results over the new connection")
        finally:
            await agent.stop()
            await asyncio.to_thread(rec.stop)
        stats = hub.app[api_pki.BOOTSTRAP_KEY].stats
        assert stats.issued == 2 and not stats.refused
    assert link.stats.connects == 2 and link.stats.disconnects == 2  # renewal + the stop
    got = [decode_result(p) for t, p, _ in rec.messages if "/results/" in t]
    for cam in ("cam-0", "cam-1"):
        seqs = sorted({r.seq for r in got if r.camera == cam})
        assert seqs and seqs == list(range(seqs[0], seqs[-1] + 1)), f"{cam}: a seq is missing"
    states = [decode_state(p) for t, p, _ in rec.messages if t.endswith("/state")]
    assert all(st.online for st in states[:-1])  # a clean DISCONNECT: no last will
    assert states[-1].online is False  # the graceful stop
    connects = [ln for ln in fleet_broker.log_text().splitlines()
                if "New client connected" in ln and "u'node-x'" in ln]
    assert len(connects) == 2


async def test_the_reconnect_presents_the_new_certificate(tmp_path: Path,
                                                          fleet_broker: Broker) -> None:
    """The broker names a client by its certificate: after the switch it must see the new one
    (here with another name, so the broker's log can tell them apart)."""
    authority = default_pki().authority
    ident = tmp_path / "identity"
    key, cert = ident / "tls.key", ident / "tls.crt"

    def install(name: str) -> None:
        issued = authority.issue(name, "agent", days=1)
        assert issued.key_pem is not None
        private = serialization.load_pem_private_key(issued.key_pem, None)
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        files.store(cert, key, issued.cert_pem, private)

    install("box-old")
    s = agent_config.MqttSettings(host="127.0.0.1", port=fleet_broker.port, tls=True,
                                  ca_file=default_pki().ca_file, cert_file=cert, key_file=key)
    link = MqttLink(s, "box-old")
    await link.start()
    try:
        assert await link.wait_connected(10)
        install("box-new")
        await asyncio.to_thread(link.reconnect_with_new_identity_sync)
        await until(lambda: link.stats.connects == 2 and link.connected, 10, "reconnected")
    finally:
        await link.aclose()
    users = re.findall(r"New client connected .* u'([^']+)'", fleet_broker.log_text())
    assert users == ["box-old", "box-new"]
