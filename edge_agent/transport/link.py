"""The agent's one MQTT connection, bridged to asyncio.

Why a wrapper: paho runs its network loop in its own thread and calls back on it; the agent is
asyncio. This module owns that boundary so nobody else has to: paho's thread (``loop_start``)
does all socket I/O; ``publish`` may be called from any thread (paho queues to its own thread);
subscription callbacks are handed to the event loop with ``call_soon_threadsafe``.

Built on ``edge_agent.common.mqtt.MqttClient`` (login with a password from a file, TLS,
reconnect with the shared jittered backoff, guarded callbacks, keepalive); what this module
adds: a PUBACK callback per published message (what the outbox drain deletes rows on), the
retained ``state`` message re-sent on every connect with a last will that says offline, a
maximum packet size announced to the broker, and inbound messages that are too large or do not
decode counted and dropped before any callback sees them.
"""

from __future__ import annotations

import asyncio
import inspect
import random
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.common import mqtt
from edge_agent.common import settings as common_settings
from edge_agent.config import ConfigError, MqttSettings
from edge_agent.contract.protocol import (
    MAX_PAYLOAD_BYTES,
    ProtocolError,
    StateMessage,
    encode,
    state_topic,
)

log = structlog.get_logger(__name__)

#: A subscription callback: ``callback(topic, message)``, plain or async, run on the event loop.
MessageCallback = Callable[[str, Any], Awaitable[None] | None]
#: A PUBACK callback: ``on_ack(token, reason_code)``, run on paho's thread; must be quick.
AckCallback = Callable[[Any, int], None]

#: Seconds between repeated log lines about the same connection trouble.
LOG_INTERVAL_S = 10.0


@dataclass
class LinkStats:
    """Connection counters (metrics and tests read them)."""

    connects: int = 0
    disconnects: int = 0
    connect_failures: int = 0
    received: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    published: int = 0


@dataclass
class _Sub:
    filter: str
    callback: MessageCallback
    qos: int
    decode: Callable[[bytes], Any] | None


class MqttLink(mqtt.MqttClient):
    """One paho client per agent. ``await start()``, then publish/subscribe; ``aclose()``."""

    def __init__(
        self,
        settings: MqttSettings,
        node: str,
        *,
        client_id: str | None = None,
        agent_version: str = "",
        rand: Callable[[], float] = random.random,
    ) -> None:
        super().__init__(
            settings, client_id or f"edge-agent-{node}",
            # the broker need not even send us what we would drop (with room for headers)
            properties={"MaximumPacketSize": 4 * MAX_PAYLOAD_BYTES},
            max_inflight=settings.max_inflight, rand=rand,
        )
        self.settings: MqttSettings = settings
        self.node = node
        self.topic_prefix = settings.topic_prefix
        self.agent_version = agent_version
        self.stats = LinkStats()
        self._subs: dict[str, _Sub] = {}
        self._acks: dict[int, tuple[AckCallback | None, Any]] = {}
        self._early: dict[int, int] = {}
        self._acks_lock = threading.Lock()
        self._aconnected: asyncio.Event | None = None
        self._state: StateMessage | None = None
        self._closing = False
        self._logged: dict[str, float] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        #: The broker's Receive Maximum (MQTT 5 CONNACK), else 65535 (logged when below
        #: ``max_inflight``).
        self.receive_maximum = 65535
        #: Bumped (under ``send_lock``) on every accepted connection, *before* paho resends
        #: the messages left unacknowledged by the previous one. A sender that needs order
        #: holds ``send_lock`` while it checks ``generation`` and publishes (see drain.py).
        self.generation = 0
        self.send_lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start connecting in paho's thread; returns at once (the broker may be down).

        Raises ``ConfigError`` when the password or TLS files cannot be used.
        """
        self.attach_loop(asyncio.get_running_loop())
        self._aconnected = asyncio.Event()
        try:
            await asyncio.to_thread(self.open_sync)
        except common_settings.ConfigError as exc:
            raise ConfigError(exc.errors) from exc

    async def aclose(self, timeout: float = 5.0) -> None:
        """Publish the offline state (if connected), disconnect cleanly, stop paho's thread."""
        self._closing = True
        if not self.running:
            return
        if self.connected:
            done = threading.Event()
            offline = self._offline_state()
            self.publish(state_topic(self.topic_prefix, self.node), encode(offline), qos=1,
                         retain=True, on_ack=lambda _t, _rc: done.set())
            await asyncio.to_thread(done.wait, timeout)
        await asyncio.to_thread(self.close_sync)
        for task in list(self._tasks):
            task.cancel()

    # ------------------------------------------------------------------ public API

    def wait_connected_sync(self, timeout: float) -> bool:
        """Block (a worker thread) until connected or ``timeout``; True when connected."""
        return self._connected.wait(timeout)

    async def wait_connected(self, timeout: float) -> bool:
        """Wait on the event loop until connected or ``timeout``; True when connected."""
        if self.connected:
            return True
        assert self._aconnected is not None, "start() first"
        try:
            await asyncio.wait_for(self._aconnected.wait(), timeout)
        except asyncio.TimeoutError:
            return self.connected
        return True

    def subscribe(self, topic_filter: str, callback: MessageCallback, *, qos: int = 1,
                  decode: Callable[[bytes], Any] | None = None) -> None:
        """Call ``callback(topic, message)`` on the event loop for each message on the filter.

        ``message`` is the raw payload, or ``decode(payload)`` when given; a payload over
        ``protocol.MAX_PAYLOAD_BYTES``, or one that ``decode`` (or the callback) rejects with
        ``ProtocolError``/``ValueError``, is counted in ``stats.rejected`` and dropped.
        Subscriptions are renewed on every connect.
        """
        self._subs[topic_filter] = _Sub(topic_filter, callback, qos, decode)
        if self.running and self.connected:
            self._subscribe([(topic_filter, qos)])

    def publish_state(self, state: StateMessage) -> None:
        """Publish the retained state (QoS 1) now if connected, and again on every connect."""
        self._state = state
        if self.connected:
            self.publish(state_topic(self.topic_prefix, self.node), encode(state), qos=1,
                         retain=True)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                on_ack: AckCallback | None = None, token: Any = None) -> bool:
        """Queue a QoS 1 or 2 message from any thread; ``on_ack(token, reason)`` runs on its ack.

        Returns False when it was not queued (not started or closed, paho refused). A message
        queued while disconnected is sent on reconnect. Raises ``ValueError`` for a message
        paho can never send (bad topic, too large): the caller must drop it.

        QoS 0 is not offered on purpose: paho reports QoS 0 sends through the same callback
        with message ids that would be reused, which could make a later QoS 1 message look
        acknowledged when it is not. Telemetry uses QoS 1 and skips while disconnected.
        """
        if qos not in (1, 2):
            raise ValueError("MqttLink.publish sends QoS 1 or 2 only")
        if not self.running:
            return False
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            return False
        self.stats.published += 1
        # paho may run the PUBACK callback before publish() returns: it then parks the code
        # in _early for us to collect here.
        with self._acks_lock:
            early = self._early.pop(info.mid, None)
            if early is None:
                self._acks[info.mid] = (on_ack, token)
                return True
        if on_ack is not None:
            on_ack(token, early)
        return True

    # ------------------------------------------------------------------ paho callbacks

    def _log_limited(self, event: str, level: str = "warning", **kw: Any) -> None:
        now = time.monotonic()
        if now - self._logged.get(event, -1e9) >= LOG_INTERVAL_S:
            self._logged[event] = now
            getattr(log, level)(event, host=self.settings.host, port=self.settings.port, **kw)

    def _offline_state(self) -> StateMessage:
        base = self._state or StateMessage(node=self.node, online=False,
                                           agent_version=self.agent_version)
        return base.model_copy(update={"online": False, "ts": time.time()})

    def _before_connect(self) -> None:
        # the will carries the newest state, so it is set again before every attempt
        self._client.will_set(state_topic(self.topic_prefix, self.node),
                              encode(self._offline_state()), qos=1, retain=True)

    def _connect_refused(self, reason: ReasonCode) -> None:
        self.stats.connect_failures += 1
        self._log_limited("mqtt_connect_refused", level="error", reason=str(reason))

    def _connection_up(self, props: Properties | None) -> None:
        rm = getattr(props, "ReceiveMaximum", None) if props is not None else None
        self.receive_maximum = int(rm) if rm else 65535
        if self.receive_maximum < self.settings.max_inflight:
            # paho cannot change its window once connected: the broker should allow ours
            # (mosquitto: max_inflight_messages >= mqtt.max_inflight; it tolerates QoS 1 over)
            self._log_limited("mqtt_receive_maximum_below_max_inflight",
                              receive_maximum=self.receive_maximum,
                              max_inflight=self.settings.max_inflight)
        with self.send_lock:
            self.generation += 1
        self.stats.connects += 1
        self._subscribe([(sub.filter, sub.qos) for sub in list(self._subs.values())])
        if self._state is not None:
            self.publish(state_topic(self.topic_prefix, self.node), encode(self._state),
                         retain=True)

    def _connection_ready(self) -> None:
        self._call_in_loop(self._set_aconnected, True)
        log.info("mqtt_connected", host=self.settings.host, port=self.settings.port,
                 receive_maximum=self.receive_maximum)

    def _connect_failed(self) -> None:
        self.stats.connect_failures += 1
        # a TLS reason (an untrusted broker, a refused or expired certificate) is named
        self._log_limited("mqtt_connect_failed", attempt=self._backoff.attempt,
                          tls_error=self.tls_error)

    def _connection_down(self, reason: ReasonCode, was_connected: bool) -> None:
        self._call_in_loop(self._set_aconnected, False)
        if was_connected:
            self.stats.disconnects += 1
            if not self._closing:
                self._log_limited("mqtt_disconnected", reason=str(reason))

    def _subscribed(self, _client: paho.Client, _userdata: Any, mid: int,
                    codes: list[ReasonCode], _props: Properties | None) -> None:
        bad = [str(c) for c in codes if c.is_failure]
        if bad:
            log.error("mqtt_subscribe_refused", mid=mid, reasons=bad)

    def _published(self, _client: paho.Client, _userdata: Any, mid: int,
                   reason: ReasonCode, _props: Properties | None) -> None:
        with self._acks_lock:
            entry = self._acks.pop(mid, None)
            if entry is None:
                self._early[mid] = reason.value
                return
        cb, token = entry
        if cb is not None:
            cb(token, reason.value)

    def _message(self, _client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        self.stats.received += 1
        payload = bytes(msg.payload)
        if len(payload) > MAX_PAYLOAD_BYTES:
            self._reject("oversize", msg.topic, len(payload))
            return
        for sub in list(self._subs.values()):
            if not paho.topic_matches_sub(sub.filter, msg.topic):
                continue
            obj: Any = payload
            if sub.decode is not None:
                try:
                    obj = sub.decode(payload)
                except (ProtocolError, ValueError) as exc:
                    self._reject("malformed", msg.topic, len(payload), error=str(exc)[:200])
                    continue
            self._call_in_loop(self._dispatch, sub, msg.topic, obj)

    def _reject(self, reason: str, topic: str, size: int, **kw: Any) -> None:
        r = self.stats.rejected
        r[reason] = r.get(reason, 0) + 1
        self._log_limited(f"mqtt_message_rejected_{reason}", topic=topic, bytes=size,
                          total=r[reason], **kw)

    # ------------------------------------------------------------------ asyncio side

    def _set_aconnected(self, up: bool) -> None:
        ev = self._aconnected
        if ev is not None:
            if up:
                ev.set()
            else:
                ev.clear()

    def _dispatch(self, sub: _Sub, topic: str, obj: Any) -> None:
        try:
            res = sub.callback(topic, obj)
        except (ProtocolError, ValueError) as exc:
            self._reject("malformed", topic, 0, error=str(exc)[:200])
            return
        except Exception:
            self._reject("callback_error", topic, 0)
            log.exception("mqtt_subscriber_failed", topic=topic)
            return
        if inspect.isawaitable(res):
            task = asyncio.ensure_future(res)
            self._tasks.add(task)
            task.add_done_callback(lambda t: self._task_done(t, topic))

    def _task_done(self, task: asyncio.Task[Any], topic: str) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, (ProtocolError, ValueError)):
            self._reject("malformed", topic, 0, error=str(exc)[:200])
        elif exc is not None:
            self._reject("callback_error", topic, 0)
            log.error("mqtt_subscriber_failed", topic=topic, error=repr(exc)[:200])
