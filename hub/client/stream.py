"""The de-duplicating MQTT subscriber shared by the results and the events consumers.

Results and track events travel the same way (the agent's durable outbox, at least once, one
gap-free seq series per (node, camera) stream, a ``seq_reset`` marker when a series starts
over), so their consumers need the same machinery; only the topics and the payload schema
differ. ``SeqSubscriber`` is that machinery; ``hub.client.results.ResultSubscriber`` and
``hub.client.events.EventSubscriber`` add a filter and a decoder.

Design (the reasons are in ``hub.client.results``' docstring, where it was first written):

- paho-mqtt 2.x in its own network thread (``edge_agent.common.mqtt``); the callback only
  queues the raw message. Decoding, de-duplication (``hub.client.seqs.Deduplicator``), gap and
  reset reports and the PUBACK happen in the consumer's thread in ``get()``, so together with
  MQTT 5 *Receive Maximum* a slow consumer holds the broker back instead of being flooded.
- A subclass's ``_decode`` turns a raw message into the item to deliver (raising
  ``ProtocolError`` for a malformed one: counted and skipped); ``_key`` gives the item's stream
  position, or None for an item outside any seq series (a retained zone occupancy), which is
  delivered as it is; ``_flag`` marks an item late or as the start of a new series.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import paho.mqtt.client as paho
import structlog
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.common import mqtt as mqtt_base
from edge_agent.common import settings as settings_base
from edge_agent.contract.protocol import ProtocolError
from hub.client.seqs import Deduplicator, Gap, Reset
from hub.config import ConfigError
from hub.errors import HubError

log = structlog.get_logger(__name__)
T = TypeVar("T")
#: A subscriber's own class (``start`` and ``__enter__`` return it; typing.Self is 3.11+).
S = TypeVar("S", bound="SeqSubscriber[Any]")


class BrokerUnavailableError(HubError, code="broker_unavailable", http_status=503,
                             exit_code=3):
    """The broker could not be reached, refused the login, or refused the subscription.

    Exit 3 as the hub client's "unreachable": scripts tell "no broker" from "nothing came" (1).
    """


class Sequenced(Protocol):
    """What a message in a seq series has (a result, an event, a snapshot)."""

    @property
    def node(self) -> str: ...
    @property
    def camera(self) -> str: ...
    @property
    def seq(self) -> int: ...


M = TypeVar("M", bound=Sequenced)


@dataclass(frozen=True)
class Delivered(Generic[M]):
    """One de-duplicated message of a seq series: the parsed message, its topic and the payload
    as sent (``hub.client.results.Received``, ``hub.client.events.Event`` and ``Snapshot``)."""

    topic: str
    payload: bytes
    message: M
    #: True when this seq had been reported missing and arrived after all.
    late: bool = False
    #: True when this message started a new series of its stream (see ``seqs.Reset``).
    reset: bool = False

    @property
    def key(self) -> tuple[str, str, int]:
        """The de-duplication key (node, camera, seq) on the message's topic."""
        return (self.message.node, self.message.camera, self.message.seq)


@dataclass(frozen=True)
class SeqKey:
    """Where an item sits in its stream: what the de-duplicator needs."""

    node: str
    camera: str
    seq: int
    ts: float
    #: ``seq_reset.first`` and ``.reason`` when the item starts a new series.
    series_first: int | None = None
    reset_reason: str | None = None


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
    #: New items a subclass's own filter left out (events by label or zone): not a loss.
    filtered: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict (for logs and ``--json`` summaries)."""
        return dict(self.__dict__)


class RateLimitedLog:
    """One warning per ``every_s`` per event, with how many were suppressed in between."""

    def __init__(self, every_s: float = 5.0) -> None:
        self.every_s = every_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, event: str, **kw: Any) -> None:
        """Log ``event`` unless it was logged less than ``every_s`` ago."""
        now = time.monotonic()
        if now - self._last.get(event, -1e9) >= self.every_s:
            self._last[event] = now
            log.warning(event, suppressed=self._suppressed.pop(event, 0), **kw)
        else:
            self._suppressed[event] = self._suppressed.get(event, 0) + 1


@dataclass
class Raw:
    """A message as paho handed it over, with the connection generation it came on."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    #: Connection generation the message came on: a packet id is only valid on its connection.
    gen: int
    #: The broker sent it from its retained store (it was there before we subscribed).
    retained: bool = False


def gap_logger(kind: str) -> Callable[[Gap], None]:
    """The default ``on_gap``: a ``{kind}_gap`` warning."""
    event = kind + "_gap"

    def on_gap(gap: Gap) -> None:
        log.warning(event, node=gap.node, camera=gap.camera, first=gap.first, last=gap.last,
                    missing=gap.count)

    return on_gap


def reset_logger(kind: str) -> Callable[[Reset], None]:
    """The default ``on_reset``: a ``{kind}_stream_reset`` warning."""
    event = kind + "_stream_reset"

    def on_reset(reset: Reset) -> None:
        log.warning(event, node=reset.node, camera=reset.camera, first=reset.first,
                    seq=reset.seq, previous=reset.previous, reason=reset.reason)

    return on_reset


class SeqSubscriber(mqtt_base.MqttClient, Generic[T]):
    """Subscribe to ``filters``, drop duplicates, report gaps and resets; a context manager.

    ``group`` makes every filter a shared subscription (``$share/{group}/...``; gap reports are
    off then: each member sees a share of every stream). ``on_gap``/``on_reset`` run in the
    consumer's thread, in order with the items. ``receive_maximum`` bounds what the broker sends
    before the consumer takes it; ``session_expiry_s`` > 0 with a fixed ``client_id`` keeps the
    broker session (and what was queued meanwhile) across restarts. TLS by default.
    """

    #: ``results`` or ``events``: the stem of the log event names.
    kind: ClassVar[str] = "stream"
    #: What ``start`` raises when the broker cannot be used.
    unavailable: ClassVar[type[BrokerUnavailableError]] = BrokerUnavailableError

    def __init__(
        self,
        host: str,
        port: int,
        *,
        filters: list[str],
        group: str | None,
        username: str | None,
        password: str | None,
        password_file: str | Path | None,
        tls: bool,
        ca_file: str | Path | None,
        cert_file: str | Path | None,
        key_file: str | Path | None,
        client_id: str,
        protocol: int,
        keepalive_s: int,
        receive_maximum: int,
        session_expiry_s: int,
        max_queue: int,
        on_gap: Callable[[Gap], None] | None,
        on_reset: Callable[[Reset], None] | None,
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
        self.filters = [f"$share/{group}/{f}" if group else f for f in filters]
        #: The first (for results, the only) subscription filter.
        self.filter = self.filters[0]
        self.group = group
        self.stats = SubscriberStats()
        self.on_gap = on_gap
        self.on_reset = on_reset
        self._dedup = Deduplicator(report_gaps=group is None)
        self._queue: queue.Queue[Raw] = queue.Queue()
        self._max_queue = max_queue
        self._gen = 0
        self._ready = threading.Event()
        self._settled = threading.Event()
        self._error: str | None = None
        self._bad = RateLimitedLog()

    # --------------------------------------------------------------- what a subclass defines

    def _decode(self, raw: Raw) -> T:
        """The item to deliver; raise ``ProtocolError`` when the payload breaks the contract."""
        raise NotImplementedError

    def _key(self, item: T) -> SeqKey | None:
        """The item's stream position (None: not part of a seq series, delivered as is)."""
        raise NotImplementedError

    def _flag(self, item: T, *, late: bool, reset: bool) -> T:
        """``item`` marked as a late arrival or as the start of a new series."""
        raise NotImplementedError

    def _wanted(self, item: T) -> bool:
        """False for an item the subscriber's own filters leave out (after de-duplication)."""
        return True

    # ------------------------------------------------------------------ network thread callbacks

    def _connect_refused(self, reason: ReasonCode) -> None:
        self._error = f"broker refused the connection: {reason}"
        self._settled.set()

    def _connection_up(self, props: Any) -> None:
        self._gen += 1
        self._subscribe([(f, 1) for f in self.filters])

    def _subscribed(
        self, _c: paho.Client, _u: Any, _mid: int, rcs: list[ReasonCode], _p: Any
    ) -> None:
        failed = [(f, rc) for f, rc in zip(self.filters, rcs, strict=False) if rc.is_failure]
        if failed:
            self._error = f"broker refused the subscription to {failed[0][0]!r}: {failed[0][1]}"
        else:
            log.info(self.kind + "_subscribed", filter=" ".join(self.filters))
            self._ready.set()
        self._settled.set()

    def _message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        if self._queue.qsize() >= self._max_queue:
            self.stats.overflow += 1
            self._bad.warning(self.kind + "_overflow", queue=self._max_queue)
            self._client.ack(msg.mid, msg.qos)
            return
        self._queue.put(Raw(msg.topic, bytes(msg.payload), msg.mid, msg.qos, self._gen,
                            bool(msg.retain)))

    def _connection_down(self, reason: ReasonCode, was_connected: bool) -> None:
        self._ready.clear()
        if reason.value != 0:
            log.warning(self.kind + "_disconnected", reason=str(reason))

    # ------------------------------------------------------------------------------- lifecycle

    def start(self: S, timeout: float = 10.0) -> S:
        """Connect and subscribe; raise ``unavailable`` if that fails within ``timeout``.

        Raises ``hub.config.ConfigError`` when the password or TLS files cannot be used.
        """
        s = self.settings
        try:
            self.open_sync()
        except settings_base.ConfigError as exc:
            raise ConfigError(exc.errors) from exc
        except (OSError, ValueError) as exc:
            raise self.unavailable(f"cannot connect to {s.host}:{s.port}: {exc}") from exc
        if not self._settled.wait(timeout) or self._error is not None:
            self.close()
            raise self.unavailable(
                self._error or f"no connection to {s.host}:{s.port} within {timeout:g} s"
            )
        return self

    def close(self) -> None:
        """Disconnect and stop the network thread (items not yet taken are not acknowledged)."""
        self.close_sync()

    def __enter__(self: S) -> S:
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

    def get(self, timeout: float | None = None) -> T | None:
        """The next new item, or None when none came within ``timeout`` seconds.

        Duplicates and malformed payloads are acknowledged, counted and skipped here; resets
        and gaps are passed to ``on_reset`` and ``on_gap`` before the item that revealed them.
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

    def __iter__(self) -> Iterator[T]:
        """Items forever (until the subscriber is closed from another thread)."""
        while True:
            r = self.get(timeout=1.0)
            if r is not None:
                yield r

    def _process(self, raw: Raw) -> T | None:
        self.stats.received += 1
        try:
            item = self._decode(raw)
        except ProtocolError as exc:
            self.stats.malformed += 1
            self._bad.warning(self.kind + "_malformed", topic=raw.topic, error=str(exc)[:200])
            return None
        key = self._key(item)
        if key is not None:
            kept = self._sequence(key, item)
            if kept is None:
                return None
            item = kept
        if not self._wanted(item):
            self.stats.filtered += 1
            return None
        self.stats.delivered += 1
        return item

    def _sequence(self, k: SeqKey, item: T) -> T | None:
        """The de-duplicator's verdict on ``item``: None for a duplicate, else it, flagged."""
        verdict, gap = self._dedup.offer(k.node, k.camera, k.seq, k.ts, k.series_first)
        if verdict == "duplicate":
            self.stats.duplicates += 1
            return None
        if verdict == "late":
            self.stats.late += 1
        elif verdict == "reset":
            self.stats.resets += 1
            if self.on_reset is not None:
                first = k.seq if k.series_first is None else k.series_first
                self.on_reset(Reset(k.node, k.camera, first, k.seq,
                                    self._dedup.previous(k.node, k.camera),
                                    k.reset_reason or "inferred"))
        if gap is not None:
            self.stats.gaps += 1
            self.stats.missing += gap.count
            if self.on_gap is not None:
                self.on_gap(gap)
        if verdict in ("late", "reset"):
            return self._flag(item, late=verdict == "late", reset=verdict == "reset")
        return item
