"""The broker config of k3s/ run for real: the rendered mosquitto.conf and acl on the mosquitto
binary, with certificates from a test CA in place of the mosquitto-tls Secret.

Only clients with a certificate from the fleet CA get in (no certificate, another CA's, or a
server certificate: refused at the handshake); each identity gets exactly its topics (a node its
own, the hub desired/state/telemetry, a consumer results/events/zones); nobody can take over
another's session; the results consumer works with a consumer identity."""

from __future__ import annotations

import getpass
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.subscribeoptions import SubscribeOptions

from edge_agent.common import mqtt as mqtt_base
from edge_agent.contract import acl
from edge_agent.contract.protocol import desired_topic, results_topic, state_topic, telemetry_topic
from hub.client.results import ResultSubscriber
from tests.hub.client.test_results import payload
from tests.support.broker import free_port, wait_port
from tests.support.pki import Identity, TestPki
from tests.support.waiting import wait_until
from tests.system.test_k3s import K3S, generated, render

HUB = acl.SITE_HUBS[0]
CONSUMER = acl.SITE_CONSUMERS[0]


class Site:
    """The K3s broker on a loopback port and the CA its clients' certificates come from."""

    def __init__(self, port: int, pki: TestPki, log: Path) -> None:
        self.port, self.pki, self.log = port, pki, log

    def identity(self, name: str) -> Identity:
        role = "hub" if name.startswith("hub:") else (
            "consumer" if name.startswith("consumer:") else "agent")
        return self.pki.identity(name, role)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """mosquitto with the k3s config; its paths and listener moved to a temp dir and loopback,
    the mosquitto-tls Secret's files made by a test CA."""
    work = tmp_path_factory.mktemp("site-mosquitto")
    pki = TestPki(work / "pki")
    server = pki.server()
    cm = generated(render(K3S), "ConfigMap", "mosquitto-config")
    port = free_port()
    conf = (
        cm["data"]["mosquitto.conf"]
        .replace("listener 8883 0.0.0.0", f"listener {port} 127.0.0.1")
        .replace("/mosquitto/tls/ca.crt", str(pki.ca_file))
        .replace("/mosquitto/tls/tls.crt", str(server.cert_file))
        .replace("/mosquitto/tls/tls.key", str(server.key_file))
        .replace("/mosquitto/config/acl", str(work / "acl"))
        .replace("/mosquitto/data/", f"{work}/data/")
        .replace("log_dest stdout", f"log_dest file {work}/mosquitto.log")
    )
    assert str(pki.ca_file) in conf and str(work / "acl") in conf, "the k3s paths moved"
    # started as root (CI), mosquitto would switch to its own user, who cannot read the temp
    # dir; in the pod it already runs as uid 1883, where this setting does nothing
    conf += f"user {getpass.getuser()}\n"
    (work / "data").mkdir()
    (work / "mosquitto.conf").write_text(conf)
    (work / "acl").write_text(cm["data"]["acl"])
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
    yield Site(port, pki, work / "mosquitto.log")
    proc.terminate()
    proc.wait(timeout=10)


class Client:
    """A paho client with a certificate that records what it receives."""

    def __init__(self, site: Site, ident: Identity | None, *, client_id: str = "",
                 will: str | None = None) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.connected = threading.Event()
        self.rc: mqtt.ReasonCode | None = None
        self.failed = threading.Event()
        self.gone = threading.Event()
        self.granted: list[bool] = []
        self.subscribed = threading.Event()
        self.arrived = threading.Condition()
        self.c = mqtt_base.PahoClient(CallbackAPIVersion.VERSION2, client_id=client_id,
                                      protocol=MQTTProtocolVersion.MQTTv5)
        if will is not None:
            self.c.will_set(will, b"offline", qos=1)
        conn = mqtt_base.ConnectionSettings(
            ca_file=site.pki.ca_file,
            cert_file=None if ident is None else ident.cert_file,
            key_file=None if ident is None else ident.key_file)
        self.c.tls_set_context(mqtt_base.tls_context(conn))
        self.c.on_connect = self._on_connect
        self.c.on_connect_fail = lambda _c, _u: self.failed.set()
        self.c.on_disconnect = lambda *_a: self.gone.set()
        self.c.on_subscribe = self._on_subscribe
        self.c.on_message = self._on_message
        self.c.connect_async("127.0.0.1", site.port)
        self.c.loop_start()

    def wait_connected(self) -> bool:
        # with TLS 1.3 the server checks the client's certificate after the client finished
        # its side of the handshake: a refusal then shows as a closed connection
        wait_until(lambda: self.connected.is_set() or self.failed.is_set()
                   or self.gone.is_set(), 10, "an answer")
        return self.connected.is_set() and self.rc is not None and not self.rc.is_failure

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

    def publish(self, topic: str, data: bytes = b"{}", retain: bool = False) -> int:
        """Publish at QoS 1; the PUBACK's reason code (0x87: not authorised)."""
        code: list[int] = []
        done = threading.Event()

        def on_publish(_c, _u, _mid, rc, _p) -> None:  # type: ignore[no-untyped-def]
            code.append(rc.value)
            done.set()

        self.c.on_publish = on_publish
        self.c.publish(topic, data, qos=1, retain=retain)
        assert done.wait(10), f"no PUBACK for {topic}"
        return code[0]

    def wait_for(self, topic: str, timeout: float = 10) -> bool:
        with self.arrived:
            return self.arrived.wait_for(lambda: any(t == topic for t, _ in self.got), timeout)

    def close(self) -> None:
        self.c.disconnect()
        mqtt_base.release(self.c)


def test_only_certificates_of_the_fleet_ca_get_in(site: Site, tmp_path: Path) -> None:
    other = TestPki(tmp_path / "other-ca")
    refused = [
        Client(site, None),  # no certificate at all
        Client(site, other.identity("box-1", "agent")),  # the right name, another CA
        Client(site, site.pki.server()),  # a server certificate cannot act as a client
    ]
    try:
        for c in refused:
            assert not c.wait_connected(), "a client without a fleet certificate got in"
        ok = Client(site, site.identity("box-1"))
        assert ok.wait_connected()
        ok.close()
    finally:
        for c in refused:
            c.close()


def test_each_identity_gets_exactly_its_topics(site: Site) -> None:
    hub = Client(site, site.identity(HUB))
    consumer = Client(site, site.identity(CONSUMER))
    box1 = Client(site, site.identity("box-1"))
    box2 = Client(site, site.identity("box-2"))
    try:
        for c in (hub, consumer, box1, box2):
            assert c.wait_connected()
        hub.subscribe("edge/+/telemetry")
        hub.subscribe("edge/+/state")
        # Mosquitto grants any subscription and filters on delivery by the read ACL: a
        # consumer subscribed to '#' still sees only results, box-1 only its own desired
        consumer.subscribe("edge/#")
        box1.subscribe("edge/#")

        # a node publishes its own results, telemetry and state; the hub desired state
        assert box1.publish(telemetry_topic("edge", "box-1")) == 0
        assert box1.publish(state_topic("edge", "box-1"), retain=True) == 0
        assert hub.publish(desired_topic("edge", "box-1"), retain=True) == 0
        assert hub.publish(desired_topic("edge", "box-2"), b"for box-2", retain=True) == 0
        # what the ACL forbids is refused (0x87) and never delivered
        forged = [
            (box1, state_topic("edge", "box-2")),  # a node speaking for another
            (box1, telemetry_topic("edge", "box-2")),
            (box1, results_topic("edge", "box-2", "cam0")),
            (box1, desired_topic("edge", "box-1")),  # a node setting its own desired state
            (consumer, results_topic("edge", "box-1", "cam0")),  # consumers only read
            (hub, telemetry_topic("edge", "box-3")),  # the hub cannot forge telemetry
            (hub, state_topic("edge", HUB)),  # nor pose as a node under its own name
            (consumer, results_topic("edge", CONSUMER, "cam0")),
        ]
        for who, topic in forged:
            assert who.publish(topic, b"forged") == 0x87, topic
        assert box1.publish(results_topic("edge", "box-1", "cam0"), b"real") == 0
        assert box2.publish(state_topic("edge", "box-2"), b"box-2 itself") == 0

        assert consumer.wait_for(results_topic("edge", "box-1", "cam0"))
        assert hub.wait_for(telemetry_topic("edge", "box-1"))
        assert hub.wait_for(state_topic("edge", "box-2"))
        assert box1.wait_for(desired_topic("edge", "box-1"))
        # everything was published in order on each connection, so anything forged would
        # have arrived by now
        assert {p for _, p in consumer.got} == {b"real"}
        assert b"forged" not in {p for _, p in hub.got}
        assert {t for t, _ in box1.got} == {desired_topic("edge", "box-1")}, "read another's"
    finally:
        for c in (hub, consumer, box1, box2):
            c.close()


def test_no_client_can_take_over_another_session(site: Site) -> None:
    """The client id is the certificate's name: box-9 asking for box-8's id does not cut box-8
    off (which would make the broker publish box-8's last will, 'offline', for it)."""
    topic = state_topic("edge", "box-8")
    box8 = Client(site, site.identity("box-8"), client_id="box-8", will=topic)
    watcher = Client(site, site.identity(HUB))
    thief = Client(site, site.identity("box-9"), client_id="box-8")
    try:
        assert box8.wait_connected() and watcher.wait_connected()
        watcher.subscribe(topic)
        assert thief.wait_connected()
        # box-8 is still connected: it can publish, and nothing ended its session
        assert box8.publish(topic, b"still here") == 0
        assert watcher.wait_for(topic)
        assert not box8.gone.is_set()
        assert {p for _, p in watcher.got} == {b"still here"}
    finally:
        for c in (box8, watcher, thief):
            c.close()


def test_results_consumer_with_its_certificate_in_a_group(site: Site) -> None:
    box1 = Client(site, site.identity("box-1"))
    ident = site.identity(CONSUMER)
    try:
        assert box1.wait_connected()
        with ResultSubscriber(
            port=site.port, ca_file=ident.ca_file, cert_file=ident.cert_file,
            key_file=ident.key_file, group="loaders",
        ) as sub:
            for seq in (0, 1, 1, 2):
                box1.publish(results_topic("edge", "box-1", "cam0"),
                             payload("box-1", "cam0", seq))
            got = [sub.get(timeout=10) for _ in range(3)]
        assert [r.message.seq for r in got if r is not None] == [0, 1, 2]
    finally:
        box1.close()
