"""An independent MQTT subscriber for tests: plain paho, none of the agent's code.

It records every message that arrives (topic, payload, retain flag) so a test can check what a
downstream subscriber really saw: missing results, duplicates, order. It reconnects by itself
(clean session, subscriptions renewed on every connect) and can wait on conditions with a
timeout instead of sleeping. It logs in as the tests' read-only observer
(``tests.support.broker.OBSERVER``) unless told to be someone else.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable

import orjson
import paho.mqtt.client as paho

from tests.support.broker import OBSERVER, Broker


class Recorder:
    """Subscribes to ``filters`` on a broker and records what arrives."""

    def __init__(self, broker: Broker, filters: list[str], *, qos: int = 1,
                 identity: str = OBSERVER) -> None:
        self.broker = broker
        self.filters = filters
        self.qos = qos
        self.messages: list[tuple[str, bytes, bool]] = []
        #: Distinct payloads so far (a redelivery has the same bytes).
        self.payloads: set[bytes] = set()
        self.subscribed_count = 0
        self._cond = threading.Condition()
        self._client = broker.client(identity, client_id=f"recorder-{uuid.uuid4().hex[:8]}")
        self._client.reconnect_delay_set(0.05, 0.2)  # type: ignore[arg-type]
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message

    def start(self, timeout: float = 10.0) -> Recorder:
        """Connect and wait until the subscription is acknowledged."""
        self._client.connect_async("127.0.0.1", self.broker.port, keepalive=5)
        self._client.loop_start()
        self.wait(lambda: self.subscribed_count > 0, timeout, "recorder subscribed")
        return self

    def stop(self) -> None:
        """Disconnect and stop paho's thread."""
        self._client.disconnect()
        self._client.loop_stop()

    def socket(self) -> object | None:
        """The network socket while connected (fault tests watch its kernel receive queue)."""
        return self._client.socket()

    def _on_connect(self, client: paho.Client, _u: object, _f: object, rc: object,
                    _p: object) -> None:
        client.subscribe([(f, self.qos) for f in self.filters])

    def _on_subscribe(self, _c: object, _u: object, _mid: int, _codes: object,
                      _p: object) -> None:
        with self._cond:
            self.subscribed_count += 1
            self._cond.notify_all()

    def _on_message(self, _c: object, _u: object, msg: paho.MQTTMessage) -> None:
        with self._cond:
            payload = bytes(msg.payload)
            self.messages.append((msg.topic, payload, bool(msg.retain)))
            self.payloads.add(payload)
            self._cond.notify_all()

    def wait(self, pred: Callable[[], bool], timeout: float, what: str = "condition") -> None:
        """Wait until ``pred()`` (checked on every message) or fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not pred():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout}s waiting for {what} "
                                         f"({len(self.messages)} messages so far)")
                self._cond.wait(min(left, 0.2))

    def count(self) -> int:
        """Messages received so far."""
        with self._cond:
            return len(self.messages)

    def distinct(self) -> int:
        """Distinct payloads received so far."""
        with self._cond:
            return len(self.payloads)

    def has_all(self, payloads: set[bytes]) -> bool:
        """True when every payload in ``payloads`` has arrived."""
        with self._cond:
            return payloads <= self.payloads

    def results(self) -> list[dict[str, object]]:
        """Decoded JSON payloads of the messages so far, in arrival order."""
        with self._cond:
            msgs = list(self.messages)
        return [orjson.loads(p) for _, p, _ in msgs]


def listen(broker: Broker, topic: str,
           on_message: Callable[[paho.Client, object, paho.MQTTMessage], None],
           *, qos: int = 1, client_id: str | None = None,
           identity: str = OBSERVER) -> paho.Client:
    """A bare paho subscriber calling ``on_message`` on paho's thread (no recording, no
    reconnect): for a probe whose own per-message work is what is measured or kept.

    Subscribes before returning the started client; stop it with
    ``edge_agent.common.mqtt.release`` after ``disconnect()``.
    """
    c = broker.client(identity, client_id=client_id or f"listen-{uuid.uuid4().hex[:8]}")
    c.on_message = on_message
    broker.connect(c)
    c.subscribe(topic, qos=qos)
    c.loop_start()
    return c
