"""The MQTT client base against a real Mosquitto: closing releases every socket, dropping the
connection is a crash the broker answers with the last will, credentials come from a file, TLS
is the default and a TLS file that cannot be used is a config error naming the field."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from pydantic import ValidationError

from edge_agent.common import mqtt, settings
from tests.support.broker import Broker, free_port
from tests.support.mqtt_recorder import Recorder
from tests.support.pki import TestPki
from tests.support.waiting import wait_until


class _WillClient(mqtt.MqttClient):
    """A client (node ``base-node``) whose last will says ``gone`` on its state topic."""

    def __init__(self, broker: Broker, prefix: str, **kw: object) -> None:
        conn = broker.connection("base-node", keepalive_s=5, reconnect_min_s=0.05,
                                 reconnect_max_s=0.2, **kw)
        super().__init__(conn, f"base-{prefix}", rand=random.Random(3).random)
        self.topic = f"{prefix}/base-node/state"
        self.ups = 0
        self.failures = 0

    def _before_connect(self) -> None:
        self._client.will_set(self.topic, b"gone", qos=1)

    def _connection_up(self, props: object) -> None:
        self.ups += 1

    def _connect_failed(self) -> None:
        self.failures += 1


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("crash", [False, True])
def test_close_releases_sockets_and_only_a_crash_sends_the_will(
    broker: Broker, topic_prefix: str, crash: bool
) -> None:
    rec = Recorder(broker, [f"{topic_prefix}/base-node/state"]).start()
    try:
        before = _fds()
        c = _WillClient(broker, topic_prefix)
        c.open_sync()
        wait_until(lambda: c.connected, 10, "connected")
        assert c.running and c.ups == 1 and c.socket() is not None
        if crash:
            c.drop_connection()
            rec.wait(lambda: rec.count() == 1, 10, "the last will")
            assert rec.messages[0][1] == b"gone"
        else:
            c.close_sync()
        assert not c.connected and not c.running and c.socket() is None
        assert _fds() == before  # no socket pair left for the garbage collector
        if not crash:
            # a clean DISCONNECT discards the will; the recorder is still there to see one
            with pytest.raises(AssertionError):
                rec.wait(lambda: rec.count() > 0, 0.5, "no will")
    finally:
        rec.stop()


def test_unreadable_password_file_names_the_field(tmp_path: Path) -> None:
    conn = mqtt.ConnectionSettings(port=free_port(), username="u",
                                   password_file=tmp_path / "missing")
    c = mqtt.MqttClient(conn, "x", field_prefix="mqtt.")
    with pytest.raises(settings.ConfigError) as info:
        c.open_sync()
    assert info.value.errors[0][0] == "mqtt.password_file"
    assert not c.running
    c.close_sync()


def test_it_keeps_reconnecting_until_a_broker_appears(tmp_path: Path, topic_prefix: str) -> None:
    b = Broker(tmp_path)  # not started yet
    c = _WillClient(b, topic_prefix)
    c.open_sync()
    try:
        wait_until(lambda: c.failures >= 3, 10, "three failed attempts")
        assert not c.connected and c.ups == 0
        b.start()
        wait_until(lambda: c.connected, 10, "connected once the broker is up")
        assert c.ups == 1
    finally:
        c.close_sync()
        b.stop()


def test_tls_on_port_8883_is_the_default() -> None:
    conn = mqtt.ConnectionSettings()
    assert conn.tls and conn.port == 8883


def test_a_certificate_without_its_key_is_refused() -> None:
    with pytest.raises(ValidationError, match="cert_file and key_file go together"):
        mqtt.ConnectionSettings(cert_file=Path("c.pem"))


@pytest.mark.parametrize("field", ["ca_file", "cert_file", "key_file"])
def test_a_missing_tls_file_names_the_field(broker: Broker, tmp_path: Path, field: str) -> None:
    conn = broker.connection("n1", **{field: tmp_path / "missing.pem"})
    c = mqtt.MqttClient(conn, "x", field_prefix="mqtt.")
    with pytest.raises(settings.ConfigError) as info:
        c.open_sync()
    assert [e[0] for e in info.value.errors] == [f"mqtt.{field}"]
    assert "cannot read TLS file" in info.value.errors[0][1]
    assert not c.running
    c.close_sync()


def test_a_broker_from_another_ca_is_not_trusted(broker: Broker, tmp_path: Path,
                                                 topic_prefix: str) -> None:
    """The client verifies the broker: with another CA's bundle it never connects."""
    other = TestPki(tmp_path / "other")
    c = _WillClient(broker, topic_prefix, ca_file=other.ca_file)
    c.open_sync()
    try:
        wait_until(lambda: c.failures >= 2, 10, "refused handshakes")
        assert not c.connected and c.ups == 0
        assert c.tls_error is not None and "certificate verify failed" in c.tls_error
    finally:
        c.close_sync()
