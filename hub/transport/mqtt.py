"""The hub's MQTT link: desired state out (retained, QoS 1), agents' state and telemetry in.

One paho-mqtt 2.x client with its own network thread, built on ``edge_agent.common.mqtt``
(login, TLS, jittered reconnect, guarded callbacks). Inbound messages are decoded in that thread
(so the event loop does not pay for JSON parsing and validation) and handed to the loop in
batches. Payloads that break the wire contract, and payloads whose ``node`` differs from the
node in their topic (a node may only publish under its own topics, so such a payload is a
forgery or a bug: it is never believed), are dropped, counted by reason (``rejected``) and
logged at most every ``_INVALID_LOG_EVERY_S`` per reason. Outbound ``desired`` messages are
published from the loop; paho keeps QoS 1 messages across reconnects, and each broker
acknowledgement is reported back on the loop (``on_ack(token)``) so the dispatcher can record
what the broker holds.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.common import mqtt as mqtt_base
from edge_agent.common import settings as settings_base
from edge_agent.contract import protocol
from edge_agent.contract.protocol import ProtocolError, StateMessage, TelemetryMessage
from hub.config import ConfigError, MqttSettings

log = structlog.get_logger(__name__)

#: QoS 1 messages paho keeps in flight at once. A wave to thousands of nodes goes out in one
#: burst; paho's default of 20 would make it a round trip per 20 messages.
MAX_INFLIGHT = 1000
#: Inbound messages handled per event-loop turn before yielding to other tasks.
_DRAIN_BATCH = 2000
_INVALID_LOG_EVERY_S = 10.0

StateHandler = Callable[[str, StateMessage], None]
TelemetryHandler = Callable[[str, TelemetryMessage], None]
#: Called on the loop with the reason of each dropped payload (``malformed``, ``node_mismatch``).
InvalidHandler = Callable[[str], None]


class NodeMismatchError(ProtocolError):
    """A payload's ``node`` is not the node its topic names."""


class HubMqtt(mqtt_base.MqttClient):
    """Use as ``async with HubMqtt(settings, on_state=..., on_telemetry=...) as link:``."""

    def __init__(
        self,
        settings: MqttSettings,
        *,
        on_state: StateHandler,
        on_telemetry: TelemetryHandler,
        on_invalid: InvalidHandler | None = None,
        on_ack: Callable[[Any], None] | None = None,
        client_id: str | None = None,
    ) -> None:
        super().__init__(
            settings,
            client_id or f"edge-hub-{os.getpid()}-{int(time.time() * 1000) % 100000}",
            max_inflight=MAX_INFLIGHT,
        )
        self.prefix = settings.topic_prefix
        self._on_state = on_state
        self._on_telemetry = on_telemetry
        self._on_invalid = on_invalid
        self.on_ack = on_ack
        self._inbox: deque[tuple[str, str, Any]] = deque()
        self._acks: deque[int] = deque()
        self._scheduled = False
        self._lock = threading.Lock()
        self._pending: dict[int, Any] = {}
        #: Dropped payloads by reason; written only by paho's thread, under ``_lock``.
        self.rejected: dict[str, int] = {}
        self._invalid_logged: dict[str, float] = {}
        self._failed_logged = -1e9
        self.published = 0

    # ---------------------------------------------------------------------------- lifecycle
    async def start(self, wait_s: float = 0.0) -> None:
        """Connect in the background; optionally wait up to ``wait_s`` for the first CONNACK.

        Raises ``ConfigError`` when the password or TLS files cannot be used.
        """
        self.attach_loop(asyncio.get_running_loop())
        try:
            # reads the password and TLS files, and paho's loop_start opens its wake-up socket
            # pair with blocking calls: not on the loop
            await asyncio.to_thread(self.open_sync)
        except settings_base.ConfigError as exc:
            raise ConfigError(exc.errors) from exc
        if wait_s > 0:
            await self.wait_connected(wait_s)
        log.info("mqtt_starting", host=self.settings.host, port=self.settings.port,
                 connected=self.connected)

    async def aclose(self) -> None:
        """Disconnect cleanly, stop the network thread and close its sockets."""
        await asyncio.to_thread(self.close_sync)

    async def __aenter__(self) -> HubMqtt:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def wait_connected(self, timeout: float) -> bool:
        """Wait until connected (True) or ``timeout`` seconds pass (False).

        Polls instead of blocking a thread, so a cancelled wait leaves nothing behind.
        """
        deadline = time.monotonic() + timeout
        while not self.connected:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    # ---------------------------------------------------------------------- paho callbacks
    def _connection_up(self, props: Any) -> None:
        self._subscribe([(protocol.state_filter(self.prefix), 1),
                         (protocol.telemetry_filter(self.prefix), 1)])

    def _connection_ready(self) -> None:
        log.info("mqtt_connected", host=self.settings.host, port=self.settings.port)

    def _connect_failed(self) -> None:
        # at most one line per interval while the broker is away; a TLS reason (an untrusted
        # broker, a refused or expired certificate) is named
        now = time.monotonic()
        if now - self._failed_logged >= _INVALID_LOG_EVERY_S:
            self._failed_logged = now
            log.warning("mqtt_connect_failed", host=self.settings.host, port=self.settings.port,
                        tls_error=self.tls_error)

    def _connection_down(self, reason: ReasonCode, was_connected: bool) -> None:
        log.warning("mqtt_disconnected", reason=str(reason))

    def _message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        try:
            node, kind, _ = protocol.parse_topic(self.prefix, msg.topic)
            obj: StateMessage | TelemetryMessage
            if kind == "state":
                obj = protocol.decode_state(bytes(msg.payload))
            elif kind == "telemetry":
                obj = protocol.decode_telemetry(bytes(msg.payload))
            else:
                return
            if obj.node != node:
                raise NodeMismatchError(
                    f"payload node {obj.node[:80]!r} differs from topic node {node!r}")
        except ProtocolError as exc:
            self._invalid(msg.topic, exc)
            return
        self._inbox.append((kind, node, obj))
        self._kick()

    def _published(self, client: paho.Client, userdata: Any, mid: int,
                   reason: ReasonCode, properties: Any) -> None:
        self._acks.append(mid)
        self._kick()

    @property
    def invalid(self) -> int:
        """Every dropped payload, whatever the reason."""
        with self._lock:
            return sum(self.rejected.values())

    def _invalid(self, topic: str, exc: Exception) -> None:
        reason = "node_mismatch" if isinstance(exc, NodeMismatchError) else "malformed"
        with self._lock:
            total = self.rejected[reason] = self.rejected.get(reason, 0) + 1
            now = time.monotonic()
            due = now - self._invalid_logged.get(reason, -1e9) >= _INVALID_LOG_EVERY_S
            if due:
                self._invalid_logged[reason] = now
        if self._loop is not None and self._on_invalid is not None:
            self._call_in_loop(self._on_invalid, reason)
        if due:
            event = "mqtt_node_mismatch" if reason == "node_mismatch" else "mqtt_invalid_payload"
            log.warning(event, topic=topic, error=str(exc)[:200], total=total)

    def _kick(self) -> None:
        with self._lock:
            if self._scheduled:
                return
            self._scheduled = True
        self._call_in_loop(self._drain)

    # ----------------------------------------------------------------------- loop side
    def _drain(self) -> None:
        with self._lock:
            self._scheduled = False
        while self._acks:
            mid = self._acks.popleft()
            token = self._pending.pop(mid, None)
            if token is not None and self.on_ack is not None:
                try:
                    self.on_ack(token)
                except Exception:
                    log.exception("mqtt_ack_handler_failed")
        for _ in range(_DRAIN_BATCH):
            if not self._inbox:
                return
            kind, node, obj = self._inbox.popleft()
            try:
                if kind == "state":
                    self._on_state(node, obj)
                else:
                    self._on_telemetry(node, obj)
            except Exception:
                log.exception("mqtt_handler_failed", node=node, kind=kind)
        if self._inbox:
            self._kick()  # more to do: let other tasks run first

    def publish_desired(self, node: str, payload: bytes, token: Any = None) -> None:
        """Publish a retained QoS 1 desired message; ``on_ack(token)`` when the broker has it.

        Call on the event loop. Never raises for a broken connection: paho keeps the message
        and sends it after reconnecting.
        """
        info = self._client.publish(protocol.desired_topic(self.prefix, node), payload,
                                    qos=1, retain=True)
        self.published += 1
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            log.error("mqtt_publish_failed", node=node, rc=int(info.rc))
            return
        if token is not None:
            self._pending[info.mid] = token
