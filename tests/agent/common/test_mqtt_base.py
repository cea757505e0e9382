"""The MQTT client base against a real Mosquitto: closing releases every socket, dropping the
connection is a crash the broker answers with the last will, and credentials come from a file."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from edge_agent.common import mqtt, settings
from tests.support.broker import Broker, free_port
from tests.support.mqtt_recorder import Recorder
from tests.support.waiting import wait_until


class _WillClient(mqtt.MqttClient):
    """A client whose last will says ``gone`` on ``{prefix}/will``."""

    def __init__(self, port: int, prefix: str) -> None:
        conn = mqtt.ConnectionSettings(port=port, keepalive_s=5, reconnect_min_s=0.05,
                                       reconnect_max_s=0.2)
        super().__init__(conn, f"base-{prefix}", rand=random.Random(3).random)
        self.topic = f"{prefix}/will"
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
    rec = Recorder(broker.port, [f"{topic_prefix}/will"]).start()
    try:
        before = _fds()
        c = _WillClient(broker.port, topic_prefix)
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
    port = free_port()
    c = _WillClient(port, topic_prefix)
    c.open_sync()
    b = Broker(tmp_path, port=port)
    try:
        wait_until(lambda: c.failures >= 3, 10, "three failed attempts")
        assert not c.connected and c.ups == 0
        b.start()
        wait_until(lambda: c.connected, 10, "connected once the broker is up")
        assert c.ups == 1
    finally:
        c.close_sync()
        b.stop()
