"""The broker config of k3s/ run for real: the rendered mosquitto.conf and acl, with a password
file made by mosquitto_passwd, on the mosquitto binary. Anonymous clients are refused, each user
gets exactly its topics, and the results consumer works with the consumer user."""

from __future__ import annotations

import getpass
import shutil
import subprocess
import threading
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.subscribeoptions import SubscribeOptions

from edge_agent.contract.protocol import desired_topic, results_topic, state_topic, telemetry_topic
from hub.client.results import ResultSubscriber, ResultsUnavailableError
from tests.hub.client.test_results import payload
from tests.support.broker import free_port, wait_port
from tests.system.test_k3s import K3S, generated, render

USERS = {"agent": "agent-pw", "hub": "hub-pw", "consumer": "consumer-pw"}


@pytest.fixture(scope="module")
def site_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """mosquitto with the k3s config; paths and the listener moved to a temp dir and loopback."""
    work = tmp_path_factory.mktemp("site-mosquitto")
    cm = generated(render(K3S), "ConfigMap", "mosquitto-config")
    port = free_port()
    conf = (
        cm["data"]["mosquitto.conf"]
        .replace("listener 1883 0.0.0.0", f"listener {port} 127.0.0.1")
        .replace("/mosquitto/secrets/passwd", str(work / "passwd"))
        .replace("/mosquitto/config/acl", str(work / "acl"))
        .replace("/mosquitto/data/", f"{work}/data/")
        .replace("log_dest stdout", f"log_dest file {work}/mosquitto.log")
    )
    # started as root (CI), mosquitto would switch to its own user, who cannot read the temp
    # dir; in the pod it already runs as uid 1883, where this setting does nothing
    conf += f"user {getpass.getuser()}\n"
    (work / "data").mkdir()
    (work / "mosquitto.conf").write_text(conf)
    (work / "acl").write_text(cm["data"]["acl"])
    passwd = work / "passwd"
    exe = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    for i, (user, pw) in enumerate(USERS.items()):
        flags = ["-c"] if i == 0 else []
        subprocess.run([exe, *flags, "-b", str(passwd), user, pw], check=True, timeout=10)
    passwd.chmod(0o600)
    mosq = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    errors = work / "stderr.txt"
    with errors.open("wb") as err:
        proc = subprocess.Popen(
            [mosq, "-c", str(work / "mosquitto.conf")], stdout=subprocess.DEVNULL, stderr=err
        )
    try:
        wait_port(port)
    except TimeoutError:
        proc.kill()
        proc.wait(timeout=10)
        pytest.fail(f"mosquitto refused the k3s config: {errors.read_text(errors='replace')}")
    yield port
    proc.terminate()
    proc.wait(timeout=10)


class Client:
    """A paho client that records what it receives and which subscriptions were granted."""

    def __init__(self, port: int, user: str | None, password: str | None = None) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.connected = threading.Event()
        self.rc: mqtt.ReasonCode | None = None
        self.granted: list[bool] = []
        self.subscribed = threading.Event()
        self.arrived = threading.Condition()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
        if user is not None:
            self.c.username_pw_set(user, password if password is not None else USERS[user])
        self.c.on_connect = self._on_connect
        self.c.on_subscribe = self._on_subscribe
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        assert self.connected.wait(10)

    def _on_connect(self, _c, _u, _f, rc, _p) -> None:  # type: ignore[no-untyped-def]
        self.rc = rc
        self.connected.set()

    def _on_subscribe(self, _c, _u, _m, rcs, _p) -> None:  # type: ignore[no-untyped-def]
        self.granted = [not rc.is_failure for rc in rcs]
        self.subscribed.set()

    def _on_message(self, _c, _u, msg) -> None:  # type: ignore[no-untyped-def]
        with self.arrived:
            self.got.append((msg.topic, msg.payload))
            self.arrived.notify_all()

    def subscribe(self, topic: str) -> None:
        self.subscribed.clear()
        self.c.subscribe(topic, options=SubscribeOptions(qos=1))
        assert self.subscribed.wait(10)

    def publish(self, topic: str, data: bytes = b"{}", retain: bool = False) -> None:
        self.c.publish(topic, data, qos=1, retain=retain).wait_for_publish(timeout=10)

    def wait_for(self, topic: str, timeout: float = 10) -> bool:
        with self.arrived:
            return self.arrived.wait_for(lambda: any(t == topic for t, _ in self.got), timeout)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def test_anonymous_and_wrong_passwords_are_refused(site_broker: int) -> None:
    for user, pw in ((None, None), ("agent", "wrong")):
        c = Client(site_broker, user, pw)
        assert c.rc is not None and c.rc.is_failure, f"{user} got in"
        c.close()
    with pytest.raises(ResultsUnavailableError, match="refused the connection"):
        ResultSubscriber(port=site_broker, username="consumer", password="nope").start(5)


def test_each_user_gets_exactly_its_topics(site_broker: int) -> None:
    hub = Client(site_broker, "hub")
    consumer = Client(site_broker, "consumer")
    agent = Client(site_broker, "agent")
    try:
        assert hub.rc is not None and not hub.rc.is_failure
        hub.subscribe("edge/+/telemetry")
        hub.subscribe("edge/+/state")
        consumer.subscribe("edge/+/results/+")
        agent.subscribe("edge/box-1/desired")
        assert agent.granted == [True]

        # Mosquitto grants any subscription and filters on delivery by the read ACL: a
        # consumer subscribed to '#' still sees only results
        consumer.subscribe("edge/#")

        # the agent publishes its results, telemetry and state; the hub its desired state
        agent.publish(telemetry_topic("edge", "box-1"))
        agent.publish(state_topic("edge", "box-1"), retain=True)
        hub.publish(desired_topic("edge", "box-1"), retain=True)
        # writes the ACL forbids are dropped by the broker: the agent cannot set desired
        # state, the consumer cannot forge results, the hub cannot forge telemetry
        agent.publish(desired_topic("edge", "box-2"), b"forged")
        consumer.publish(results_topic("edge", "box-1", "cam0"), b"forged")
        hub.publish(telemetry_topic("edge", "box-3"), b"forged")
        agent.publish(results_topic("edge", "box-1", "cam0"), b"real")

        assert consumer.wait_for(results_topic("edge", "box-1", "cam0"))
        assert hub.wait_for(telemetry_topic("edge", "box-1"))
        assert hub.wait_for(state_topic("edge", "box-1"))
        assert agent.wait_for(desired_topic("edge", "box-1"))
        # everything was published in order on each connection, so anything forged would
        # have arrived by now
        assert {p for _, p in consumer.got} == {b"real"}
        assert {t for t, _ in consumer.got} == {results_topic("edge", "box-1", "cam0")}
        assert telemetry_topic("edge", "box-3") not in {t for t, _ in hub.got}
        assert desired_topic("edge", "box-2") not in {t for t, _ in agent.got}
    finally:
        for c in (hub, consumer, agent):
            c.close()


def test_results_consumer_with_the_consumer_user_in_a_group(site_broker: int) -> None:
    agent = Client(site_broker, "agent")
    try:
        with ResultSubscriber(
            port=site_broker, username="consumer", password="consumer-pw", group="loaders"
        ) as sub:
            for seq in (0, 1, 1, 2):
                agent.publish(results_topic("edge", "box-1", "cam0"), payload("box-1", "cam0", seq))
            got = [sub.get(timeout=10) for _ in range(3)]
        assert [r.message.seq for r in got if r is not None] == [0, 1, 2]
    finally:
        agent.close()
