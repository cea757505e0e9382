"""The agent's MQTT link against a real Mosquitto (TLS, client certificates, the production
ACL): state and will, subscriptions, bad input, MQTT 3.1.1, a password over server-only TLS,
reconnects, telemetry and metrics."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from edge_agent.config import MqttSettings, OutboxSettings
from edge_agent.contract.protocol import (
    CameraTelemetry,
    DesiredMessage,
    ModelTelemetry,
    OutboxTelemetry,
    ProtocolError,
    StateMessage,
    decode_desired,
    decode_state,
    decode_telemetry,
    desired_topic,
    state_topic,
    telemetry_topic,
)
from edge_agent.errors import AgentError
from edge_agent.outbox.facade import Outbox
from edge_agent.transport.drain import Drain
from edge_agent.transport.link import MqttLink
from edge_agent.transport.metrics import register
from edge_agent.transport.telemetry import TelemetryPublisher
from tests.support.broker import HUB, Broker, free_port
from tests.support.mqtt_recorder import Recorder
from tests.support.outbox_driver import mqtt_args, result
from tests.support.outbox_faults import ROOT
from tests.support.pki import TestPki
from tests.support.waiting import wait_until


def settings(broker: Broker, node: str, prefix: str, **kw: Any) -> MqttSettings:
    """The agent's mqtt settings on ``broker``, logged in as ``node``."""
    kw.setdefault("reconnect_min_s", 0.05)
    kw.setdefault("reconnect_max_s", 0.2)
    return MqttSettings(**{**broker.settings(node), **kw}, topic_prefix=prefix, keepalive_s=5)


def publish_raw(broker: Broker, topic: str, payloads: list[bytes], retain: bool = False,
                identity: str = HUB) -> None:
    """Publish as ``identity`` (default the hub) with a plain paho client (QoS 1) and wait for
    every PUBACK."""
    c = broker.client(identity)
    broker.connect(c)
    c.loop_start()
    try:
        infos = [c.publish(topic, p, qos=1, retain=retain) for p in payloads]
        for info in infos:
            info.wait_for_publish(10)
    finally:
        c.disconnect()
        c.loop_stop()


def desired(node: str, generation: int) -> bytes:
    return orjson.dumps({"v": 1, "node": node, "generation": generation, "models": {
        "det": {"version": "1.2.0", "sha256": "a" * 64, "url": "http://hub/a",
                "manifest_url": "http://hub/m"}}})


async def test_retries_until_a_broker_appears(tmp_path: Path, topic_prefix: str) -> None:
    broker = Broker(tmp_path)  # not started yet
    link = MqttLink(settings(broker, "node-r", topic_prefix), "node-r")
    await link.start()
    try:
        await asyncio.to_thread(wait_until, lambda: link.stats.connect_failures >= 3, 10,
                                "repeated attempts")
        assert not link.connected
        await asyncio.to_thread(broker.start)
        assert await link.wait_connected(10)
        assert link.stats.connects == 1
    finally:
        await link.aclose()
        broker.stop()


# ------------------------------------------------------------------------ state and will


async def test_state_is_retained_and_clean_close_says_offline(
    broker: Broker, topic_prefix: str
) -> None:
    node = "node-s"
    link = MqttLink(settings(broker, node, topic_prefix), node, agent_version="1.0")
    await link.start()
    assert await link.wait_connected(10)
    link.publish_state(StateMessage(node=node, online=True, generation=7, agent_version="1.0"))
    rec = Recorder(broker, [state_topic(topic_prefix, node)]).start()
    try:
        rec.wait(lambda: rec.count() >= 1, 10, "retained state")
        _topic, payload, retained = rec.messages[0]
        st = decode_state(payload)
        assert st.online and st.generation == 7 and retained
        await link.aclose()
        rec.wait(lambda: rec.count() >= 2, 10, "offline state")
        off = decode_state(rec.messages[-1][1])
        assert not off.online and off.generation == 7
    finally:
        rec.stop()
    late = Recorder(broker, [state_topic(topic_prefix, node)]).start()
    try:
        late.wait(lambda: late.count() >= 1, 10, "retained offline state")
        assert not decode_state(late.messages[0][1]).online
    finally:
        late.stop()


def test_last_will_says_offline_when_the_agent_is_killed(
    broker: Broker, topic_prefix: str, tmp_path: Path
) -> None:
    node = "node-w"
    rec = Recorder(broker, [state_topic(topic_prefix, node)]).start()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.outbox_driver", "--db", str(tmp_path / "o.sqlite3"),
         *mqtt_args(broker.settings(node)), "--prefix", topic_prefix, "--node", node,
         "--max-batches", "1"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        rec.wait(lambda: any(decode_state(p).online for _, p, _ in rec.messages), 20,
                 "online state")
        proc.kill()
        proc.wait(10)
        rec.wait(lambda: not decode_state(rec.messages[-1][1]).online, 20, "the last will")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()
        rec.stop()


# ---------------------------------------------------------------------------- subscribing


async def test_subscription_runs_on_the_loop_and_survives_a_broker_restart(
    own_broker: Broker, topic_prefix: str
) -> None:
    node = "node-d"
    got: list[tuple[str, DesiredMessage, int]] = []
    loop_thread = threading.get_ident()
    link = MqttLink(settings(own_broker, node, topic_prefix), node)
    link.subscribe(desired_topic(topic_prefix, node),
                   lambda t, m: got.append((t, m, threading.get_ident())),
                   decode=decode_desired)
    await link.start()
    try:
        assert await link.wait_connected(10)
        await asyncio.to_thread(publish_raw, own_broker, desired_topic(topic_prefix, node),
                                [desired(node, 1)], True)
        await asyncio.to_thread(wait_until, lambda: len(got) == 1, 10, "desired 1")
        topic, msg, thread = got[0]
        assert topic == desired_topic(topic_prefix, node)
        assert msg.generation == 1 and msg.models["det"].version == "1.2.0"
        assert thread == loop_thread
        own_broker.kill()
        await asyncio.to_thread(own_broker.start)
        assert await link.wait_connected(10) or await link.wait_connected(10)
        await asyncio.to_thread(wait_until, lambda: link.stats.connects == 2, 10, "reconnect")
        await asyncio.to_thread(publish_raw, own_broker, desired_topic(topic_prefix, node),
                                [desired(node, 2)], True)
        await asyncio.to_thread(wait_until, lambda: any(m.generation == 2 for _, m, _ in got),
                                10, "desired 2 after the restart")
    finally:
        await link.aclose()


async def test_malformed_and_oversize_messages_change_nothing(
    broker: Broker, topic_prefix: str
) -> None:
    node = "node-m"
    applied: list[int] = []

    async def apply(_topic: str, msg: DesiredMessage) -> None:
        if msg.node != node:
            raise ProtocolError("desired state for another node")
        applied.append(msg.generation)

    link = MqttLink(settings(broker, node, topic_prefix), node)
    link.subscribe(desired_topic(topic_prefix, node), apply, decode=decode_desired)
    await link.start()
    try:
        assert await link.wait_connected(10)
        bad = [
            b"\xff\xfe not json",
            b"[1, 2, 3]",
            orjson.dumps({"v": 2, "node": node, "generation": 3, "models": {}}),
            orjson.dumps({"v": 1, "node": node, "generation": "x", "models": {}}),
            orjson.dumps({"v": 1, "node": node, "generation": 4, "models": {
                "Bad Name": {"version": "1", "sha256": "a" * 64, "url": "u",
                             "manifest_url": "m"}}}),
            desired(node, 5).replace(b"a" * 64, b"z" * 64),  # sha256 not hex
            desired("other-node", 6),  # decodes, refused by the handler
            b"{" + b" " * (300 * 1024) + b"}",  # over MAX_PAYLOAD_BYTES
        ]
        await asyncio.to_thread(publish_raw, broker, desired_topic(topic_prefix, node), bad)
        await asyncio.to_thread(publish_raw, broker, desired_topic(topic_prefix, node),
                                [desired(node, 9)])
        await asyncio.to_thread(wait_until, lambda: applied == [9], 10, "the valid message")
        assert link.stats.received == len(bad) + 1
        assert link.stats.rejected == {"malformed": 7, "oversize": 1}
        assert link.connected and link.stats.connects == 1
    finally:
        await link.aclose()


# ------------------------------------------------------------------------ results flowing


async def test_results_flow_in_order_over_mqtt_311(
    broker: Broker, topic_prefix: str, tmp_path: Path
) -> None:
    node = "node-3"
    rec = Recorder(broker, [f"{topic_prefix}/+/results/+"]).start()
    outbox = await Outbox(OutboxSettings(path=tmp_path / "o.sqlite3", commit_interval_ms=10),
                          topic_prefix=topic_prefix).aopen()
    link = MqttLink(settings(broker, node, topic_prefix, protocol=3), node)
    await link.start()
    drain = Drain(outbox, link)
    drain.start()
    try:
        sent: dict[str, list[int]] = {"cam0": [], "cam1": [], "cam2": []}
        for i in range(2000):
            cam = f"cam{i % 3}"
            outbox.publish(result(node, cam, str(i)))
            sent[cam].append(i)
        await asyncio.to_thread(rec.wait, lambda: rec.distinct() >= 2000, 30, "all results")
        got: dict[str, list[int]] = {"cam0": [], "cam1": [], "cam2": []}
        seqs: dict[str, list[int]] = {"cam0": [], "cam1": [], "cam2": []}
        for topic, payload, _ in rec.messages:
            obj = orjson.loads(payload)
            assert topic == f"{topic_prefix}/{node}/results/{obj['camera']}"
            got[obj["camera"]].append(int(obj["x"]))
            seqs[obj["camera"]].append(obj["seq"])
        assert got == sent
        assert all(s == list(range(s[0], s[0] + len(s))) for s in seqs.values())
        assert await asyncio.to_thread(drain.wait_acked, 2000, 10)
        assert await outbox.aflush()
        assert outbox.depth == 0 and outbox.stats.delivered == 2000
        reg = CollectorRegistry()
        register(reg, outbox, link, drain)
        text = generate_latest(reg).decode()
        assert "edge_agent_mqtt_connected 1.0" in text
        assert "edge_agent_outbox_delivered_total 2000.0" in text
        assert "edge_agent_outbox_inflight 0.0" in text
    finally:
        await drain.aclose()
        await link.aclose()
        await outbox.aclose()
        rec.stop()


# ---------------------------------------------------------------------- TLS and password


@pytest.fixture
def password_broker(tmp_path: Path, pki: TestPki) -> Any:
    """Mosquitto with server-only TLS that requires a user name and password instead of a
    client certificate: the login this test is about (sites whose broker is not ours)."""
    pwfile = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pwfile), "agent", "s3cret"],
                   check=True, capture_output=True)
    server = pki.server()
    b = Broker(tmp_path, persistence=False, pki=pki)
    b.conf.write_text("\n".join([
        # as root, mosquitto would switch to user "mosquitto", who cannot read pytest's
        # private temporary folders (ignored when not run as root)
        "user root",
        f"listener {b.port} 127.0.0.1",
        f"cafile {pki.ca_file}", f"certfile {server.cert_file}", f"keyfile {server.key_file}",
        "allow_anonymous false", f"password_file {pwfile}",
        f"log_dest file {b.log}", "log_type error", "log_type warning",
    ]) + "\n")
    b.start()
    yield b
    b.stop()


@pytest.mark.parametrize(("password", "ok"), [("s3cret\n", True), ("wrong\n", False)])
async def test_tls_with_password_from_file(
    password_broker: Broker, pki: TestPki, tmp_path: Path, topic_prefix: str, password: str,
    ok: bool
) -> None:
    b = password_broker
    pw = tmp_path / "agent-password"
    pw.write_text(password)
    pw.chmod(0o600)
    link = MqttLink(MqttSettings(port=b.port, topic_prefix=topic_prefix, ca_file=pki.ca_file,
                                 username="agent", password_file=pw, reconnect_min_s=0.05,
                                 reconnect_max_s=0.2), "node-t")
    await link.start()
    try:
        if ok:
            assert await link.wait_connected(10)
            assert link.publish(telemetry_topic(topic_prefix, "node-t"), b"{}")
        else:
            await asyncio.to_thread(wait_until, lambda: link.stats.connect_failures >= 2, 10,
                                    "refused attempts")
            assert not link.connected and link.stats.connects == 0
    finally:
        await link.aclose()


async def test_unreadable_password_file_is_a_clear_error(tmp_path: Path) -> None:
    link = MqttLink(MqttSettings(port=free_port(), topic_prefix="p", username="u",
                                 password_file=tmp_path / "missing"), "node-x")
    with pytest.raises(AgentError, match="password_file"):
        await link.start()


# ------------------------------------------------------------------------------ telemetry


async def test_telemetry_from_providers(broker: Broker, topic_prefix: str) -> None:
    node = "node-tm"
    link = MqttLink(settings(broker, node, topic_prefix), node)

    def broken() -> list[CameraTelemetry]:
        raise RuntimeError("camera registry gone")

    tel = TelemetryPublisher(
        link, node, 10.0, agent_version="1.0",
        models=lambda: [ModelTelemetry(name="det", version="2", frames=10, errors=1)],
        cameras=broken,
        outbox=lambda: OutboxTelemetry(depth=5, bytes=100, dropped={"max_bytes": 2}),
    )
    assert not tel.publish_once() and tel.skipped == 1  # not connected: skipped, not queued
    await link.start()
    rec = Recorder(broker, [telemetry_topic(topic_prefix, node)]).start()
    try:
        assert await link.wait_connected(10)
        assert tel.publish_once()
        rec.wait(lambda: rec.count() >= 1, 10, "telemetry")
        msg = decode_telemetry(rec.messages[0][1])
        assert msg.node == node and msg.interval_s == 10.0 and msg.agent_version == "1.0"
        assert msg.models[0].name == "det" and msg.models[0].errors == 1
        assert msg.cameras == []  # the failing provider costs only its part
        assert msg.outbox.depth == 5 and msg.outbox.dropped == {"max_bytes": 2}
        assert msg.rss_bytes > 10 * 1024 * 1024
    finally:
        await link.aclose()
        rec.stop()


async def test_results_the_broker_refuses_are_dropped_and_counted(
    tmp_path: Path, topic_prefix: str
) -> None:
    """An ACL that forbids one camera's topic: PUBACK 0x87, rows dropped and counted."""
    b = Broker(tmp_path, persistence=False)
    # the node may publish one camera's results only; the observer reads everything
    (tmp_path / "acl").write_text("pattern write +/%u/results/cam0\n"
                                  "user test:observer\ntopic read #\n")
    b.start()
    node = "node-acl"
    rec = Recorder(b, [f"{topic_prefix}/+/results/+"]).start()
    outbox = await Outbox(OutboxSettings(path=tmp_path / "o.sqlite3", commit_interval_ms=10),
                          topic_prefix=topic_prefix).aopen()
    link = MqttLink(settings(b, node, topic_prefix), node)
    await link.start()
    drain = Drain(outbox, link)
    drain.start()
    try:
        for i in range(100):
            outbox.publish(result(node, "cam0" if i % 2 else "cam1", str(i)))
        await asyncio.to_thread(wait_until, lambda: drain.acked + drain.refused == 100, 20,
                                "every result answered")
        rec.wait(lambda: rec.count() >= 50, 10, "the allowed camera")
        assert {orjson.loads(p)["camera"] for _, p, _ in rec.messages} == {"cam0"}
        assert await outbox.aflush()
        assert outbox.depth == 0
        assert outbox.dropped() == {"broker_rejected": 50}
        assert drain.deferred == 0
    finally:
        await drain.aclose()
        await link.aclose()
        await outbox.aclose()
        rec.stop()
        b.stop()
