"""A de-duplicating subscriber for the agents' results, for consumers' own code and the CLI.

Results travel at least once (DESIGN.md): after a broker outage or an agent restart the outbox
re-sends what the broker never acknowledged, so a subscriber sees some results twice. Every
consumer has to drop those by the key (node, camera, seq), and most also want to know when results
went missing (an outbox that dropped under its disk budget, a consumer that was away). This module
does both once, so downstream code only sees each result once, in arrival order.

Design:

- paho-mqtt 2.x in its own network thread (the shared client base, ``edge_agent.common.mqtt``:
  login, TLS, jittered reconnect); the callback only appends the raw message to a queue.
  Parsing (``protocol.decode_result``), de-duplication, gap detection and the PUBACK all happen in
  the consumer's thread, in ``get()``. Acknowledging only when the consumer takes a result
  (``manual_ack``) together with MQTT 5 *Receive Maximum* makes the broker hold back instead of
  flooding a slow consumer, and acknowledgements go out in the order messages came in.
- Per (node, camera) stream it keeps the highest seq seen, the newest frame timestamp, the
  first seq of the current series when known, and the ranges of seqs still missing. The agent
  numbers a camera's committed results without holes, across its restarts, so a seq above the
  highest + 1 opens a gap: results were lost. A missing seq that arrives later is delivered
  (``late``); any other seq at or below the highest is a duplicate.
- A reset is not a loss: when an agent's outbox file was replaced (deleted, lost, moved aside as
  corrupt) its camera starts a new series, and the first result of it carries ``seq_reset``
  (the series' first seq and why). A marker for a series other than the stream's current one
  restarts the stream there (``on_reset``), with a gap only for the new series' own seqs that
  are missing. Without a marker (an older agent), a seq at or below the highest whose frame
  time is newer than anything seen on the stream is taken as a reset too (a duplicate is a copy
  of a result already seen, so it can never carry a newer timestamp).
- With a group, it subscribes with an MQTT 5 shared subscription ``$share/{group}/{filter}`` so
  several consumers split the load. The broker hands each message to one member, so members see
  interleaved subsets of each stream: gap reporting is off in a group (every member would see
  "gaps" that its peers received), and a redelivery may land on another member, so exactly-once
  across the group needs the key downstream too.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import paho.mqtt.client as paho
import structlog
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.common import mqtt as mqtt_base
from edge_agent.common import settings as settings_base
from edge_agent.contract.protocol import (
    DEFAULT_TOPIC_PREFIX,
    ProtocolError,
    ResultMessage,
    decode_result,
    parse_topic,
    results_filter,
)
from hub.client.seqs import Deduplicator, Gap, Reset
from hub.config import ConfigError
from hub.errors import HubError

log = structlog.get_logger(__name__)

class ResultsUnavailableError(HubError, code="broker_unavailable", http_status=503,
                              exit_code=3):
    """The broker could not be reached, refused the login, or refused the subscription.

    Exit 3 as the hub client's "unreachable": scripts tell "no broker" from "no results" (1).
    """


@dataclass(frozen=True)
class Received:
    """One de-duplicated result: the parsed message, its topic and the payload as sent."""

    topic: str
    payload: bytes
    message: ResultMessage
    #: True when this seq had been reported missing and arrived after all.
    late: bool = False
    #: True when this result started a new series of its stream (see ``Reset``).
    reset: bool = False

    @property
    def key(self) -> tuple[str, str, int]:
        """The de-duplication key (node, camera, seq)."""
        return (self.message.node, self.message.camera, self.message.seq)


@dataclass
class SubscriberStats:
    """Counters since the subscriber started. ``received`` = everything the broker sent."""

    received: int = 0
    delivered: int = 0
    duplicates: int = 0
    malformed: int = 0
    #: Gap events and the seqs they named.
    gaps: int = 0
    missing: int = 0
    #: Seqs reported missing that arrived later (delivered, and taken off ``missing``' tally).
    late: int = 0
    #: Streams whose seq started over (an agent whose outbox was replaced).
    resets: int = 0
    #: Messages dropped because the local queue was full (only QoS 0 publishers can cause it).
    overflow: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict (for logs and ``--json`` summaries)."""
        return dict(self.__dict__)


class _RateLimitedLog:
    """One warning per ``every_s`` per event, with how many were suppressed in between."""

    def __init__(self, every_s: float = 5.0) -> None:
        self.every_s = every_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, event: str, **kw: Any) -> None:
        now = time.monotonic()
        if now - self._last.get(event, -1e9) >= self.every_s:
            self._last[event] = now
            log.warning(event, suppressed=self._suppressed.pop(event, 0), **kw)
        else:
            self._suppressed[event] = self._suppressed.get(event, 0) + 1


@dataclass
class _Raw:
    topic: str
    payload: bytes
    mid: int
    qos: int
    #: Connection generation the message came on: a packet id is only valid on its connection.
    gen: int


def _log_reset(reset: Reset) -> None:
    log.warning(
        "results_stream_reset",
        node=reset.node,
        camera=reset.camera,
        first=reset.first,
        seq=reset.seq,
        previous=reset.previous,
        reason=reset.reason,
    )


def _log_gap(gap: Gap) -> None:
    log.warning(
        "results_gap",
        node=gap.node,
        camera=gap.camera,
        first=gap.first,
        last=gap.last,
        missing=gap.count,
    )


class ResultSubscriber(mqtt_base.MqttClient):
    """Subscribe to results, drop duplicates, report gaps. Use as a context manager.

    ``node`` / ``camera`` narrow the subscription (MQTT wildcards otherwise). ``group`` makes it a
    shared subscription so consumers in the same group split the messages. ``on_gap`` and
    ``on_reset`` are called in the consumer's thread, in order with the results (default: a
    ``results_gap`` / ``results_stream_reset`` warning); a reset is never reported as a gap.
    ``receive_maximum`` bounds the results the broker sends before the consumer takes them.
    ``session_expiry_s`` > 0 with a fixed ``client_id`` keeps the broker session across restarts
    (results queued while away are delivered on return). TLS by default: ``ca_file`` verifies
    the broker, ``cert_file``/``key_file`` are the consumer's own identity (a ``consumer:...``
    certificate, docs/security.md).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8883,
        *,
        topic_prefix: str = DEFAULT_TOPIC_PREFIX,
        node: str | None = None,
        camera: str | None = None,
        group: str | None = None,
        username: str | None = None,
        password: str | None = None,
        password_file: str | Path | None = None,
        tls: bool = True,
        ca_file: str | Path | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        client_id: str = "",
        protocol: int = 5,
        keepalive_s: int = 15,
        receive_maximum: int = 1000,
        session_expiry_s: int = 0,
        max_queue: int = 100_000,
        on_gap: Callable[[Gap], None] | None = _log_gap,
        on_reset: Callable[[Reset], None] | None = _log_reset,
    ) -> None:
        if group is not None and (not group or any(c in group for c in "/+#")):
            raise ValueError("group must be non-empty and contain no '/', '+' or '#'")
        connection = mqtt_base.ConnectionSettings(
            host=host, port=port, protocol=protocol, keepalive_s=keepalive_s,
            username=username, password_file=password_file, tls=tls, ca_file=ca_file,
            cert_file=cert_file, key_file=key_file,
        )
        props = {"ReceiveMaximum": receive_maximum}
        if session_expiry_s:
            props["SessionExpiryInterval"] = session_expiry_s
        super().__init__(
            connection, client_id, password=password, properties=props,
            persistent=session_expiry_s != 0, manual_ack=True, field_prefix="",
        )
        self.prefix = topic_prefix
        filt = results_filter(topic_prefix, node or "+", camera or "+")
        self.filter = f"$share/{group}/{filt}" if group else filt
        self.group = group
        self.stats = SubscriberStats()
        self.on_gap = on_gap
        self.on_reset = on_reset
        self._dedup = Deduplicator(report_gaps=group is None)
        self._queue: queue.Queue[_Raw] = queue.Queue()
        self._max_queue = max_queue
        self._gen = 0
        self._ready = threading.Event()
        self._settled = threading.Event()
        self._error: str | None = None
        self._bad = _RateLimitedLog()

    # ------------------------------------------------------------------ network thread callbacks

    def _connect_refused(self, reason: ReasonCode) -> None:
        self._error = f"broker refused the connection: {reason}"
        self._settled.set()

    def _connection_up(self, props: Any) -> None:
        self._gen += 1
        self._subscribe([(self.filter, 1)])

    def _subscribed(
        self, _c: paho.Client, _u: Any, _mid: int, rcs: list[ReasonCode], _p: Any
    ) -> None:
        if any(rc.is_failure for rc in rcs):
            self._error = f"broker refused the subscription to {self.filter!r}: {rcs[0]}"
        else:
            log.info("results_subscribed", filter=self.filter)
            self._ready.set()
        self._settled.set()

    def _message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        if self._queue.qsize() >= self._max_queue:
            self.stats.overflow += 1
            self._bad.warning("results_overflow", queue=self._max_queue)
            self._client.ack(msg.mid, msg.qos)
            return
        self._queue.put(_Raw(msg.topic, bytes(msg.payload), msg.mid, msg.qos, self._gen))

    def _connection_down(self, reason: ReasonCode, was_connected: bool) -> None:
        self._ready.clear()
        if reason.value != 0:
            log.warning("results_disconnected", reason=str(reason))

    # ------------------------------------------------------------------------------- lifecycle

    def start(self, timeout: float = 10.0) -> ResultSubscriber:
        """Connect and subscribe; raise ResultsUnavailableError if that fails within ``timeout``.

        Raises ``hub.config.ConfigError`` when the password or TLS files cannot be used.
        """
        s = self.settings
        try:
            self.open_sync()
        except settings_base.ConfigError as exc:
            raise ConfigError(exc.errors) from exc
        except (OSError, ValueError) as exc:
            raise ResultsUnavailableError(f"cannot connect to {s.host}:{s.port}: {exc}") from exc
        if not self._settled.wait(timeout) or self._error is not None:
            self.close()
            raise ResultsUnavailableError(
                self._error or f"no connection to {s.host}:{s.port} within {timeout:g} s"
            )
        return self

    def close(self) -> None:
        """Disconnect and stop the network thread (results not yet taken are not acknowledged)."""
        self.close_sync()

    def __enter__(self) -> ResultSubscriber:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def pending(self) -> int:
        """Messages received from the broker and not yet taken by ``get()``."""
        return self._queue.qsize()

    @property
    def connected(self) -> bool:
        """True while connected and subscribed (not merely connected, as in the base)."""
        return self._ready.is_set()

    # --------------------------------------------------------------------------- consumption

    def get(self, timeout: float | None = None) -> Received | None:
        """The next new result, or None when none came within ``timeout`` seconds.

        Duplicates and malformed payloads are acknowledged, counted and skipped here; resets
        and gaps are passed to ``on_reset`` and ``on_gap`` before the result that revealed them.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                raw = self._queue.get(timeout=remaining)
            except queue.Empty:
                return None
            out = self._process(raw)
            if raw.gen == self._gen:
                self._client.ack(raw.mid, raw.qos)
            if out is not None:
                return out

    def __iter__(self) -> Iterator[Received]:
        """Results forever (until the subscriber is closed from another thread)."""
        while True:
            r = self.get(timeout=1.0)
            if r is not None:
                yield r

    def _process(self, raw: _Raw) -> Received | None:
        self.stats.received += 1
        try:
            msg = decode_result(raw.payload)
            node, kind, camera = parse_topic(self.prefix, raw.topic)
            if kind != "results" or (node, camera) != (msg.node, msg.camera):
                raise ProtocolError(
                    f"payload names {msg.node}/{msg.camera} but came on {raw.topic!r}"
                )
        except ProtocolError as exc:
            self.stats.malformed += 1
            self._bad.warning("results_malformed", topic=raw.topic, error=str(exc)[:200])
            return None
        mark = msg.seq_reset
        verdict, gap = self._dedup.offer(msg.node, msg.camera, msg.seq, msg.ts,
                                         None if mark is None else mark.first)
        if verdict == "duplicate":
            self.stats.duplicates += 1
            return None
        if verdict == "late":
            self.stats.late += 1
        elif verdict == "reset":
            self.stats.resets += 1
            if self.on_reset is not None:
                self.on_reset(Reset(
                    msg.node, msg.camera, msg.seq if mark is None else mark.first, msg.seq,
                    self._dedup.previous(msg.node, msg.camera),
                    "inferred" if mark is None else mark.reason))
        if gap is not None:
            self.stats.gaps += 1
            self.stats.missing += gap.count
            if self.on_gap is not None:
                self.on_gap(gap)
        self.stats.delivered += 1
        return Received(raw.topic, raw.payload, msg, late=verdict == "late",
                        reset=verdict == "reset")


__all__ = ["Deduplicator", "Gap", "Received", "Reset", "ResultSubscriber",
           "ResultsUnavailableError", "SubscriberStats"]
