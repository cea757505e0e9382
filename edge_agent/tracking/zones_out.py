"""Retained zone occupancy: the latest count per zone, kept current on the broker.

Why not through the outbox: occupancy is state, not history. Only the latest value of each
zone matters, it must be retained (a new subscriber reads it at once), and a value that could
not be sent is replaced by a newer one rather than queued. ``ZoneBoard`` keeps the latest
payload per (camera, zone) and which ones changed; ``ZoneBoard.run`` (the supervised
``zones`` task) looks every ``PUBLISH_INTERVAL_S`` while the link is up and publishes a zone
whose count differs from what it last published there, at most once per ``min_interval_s``
(changes in between coalesce: the latest wins, and a count back at the published value sends
nothing); every zone again after a reconnect (the broker may have restarted without our
retained messages) and every ``refresh_s`` anyway. QoS 1, retained, on
``contract.events.zone_topic``. The events carry each object's zone changes as they happen;
this topic is the current count, for dashboards and new subscribers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Protocol

import structlog

from edge_agent.contract import events as wire
from edge_agent.contract.protocol import encode_dict

log = structlog.get_logger(__name__)

#: Seconds between looks for changed zones (a change is on the broker within about this).
PUBLISH_INTERVAL_S = 0.2


class RetainedLink(Protocol):
    """What the board needs of the MQTT link (``transport.link.MqttLink``)."""

    @property
    def connected(self) -> bool:
        """True while connected to the broker."""
        ...

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                on_ack: Any = None, token: Any = None) -> bool:
        """Queue a message; False when it was not queued."""
        ...


class ZoneBoard:
    """The latest occupancy per zone and what is still to publish (event loop only)."""

    def __init__(self, link: RetainedLink | None, *, prefix: str, node: str,
                 refresh_s: float, min_interval_s: float = 0.0,
                 connects: Callable[[], int] = lambda: 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.link = link
        self.prefix = prefix
        self.node = node
        self.refresh_s = refresh_s
        self.min_interval_s = min_interval_s
        self._connects = connects
        self._clock = clock
        self.latest: dict[tuple[str, str], dict[str, Any]] = {}
        self._dirty: set[tuple[str, str]] = set()
        #: Per zone: the labels last handed to the link, and when.
        self._sent: dict[tuple[str, str], tuple[dict[str, int], float]] = {}
        self._seen_connects = -1
        self._refreshed = clock()
        #: Messages handed to the link, and refused by it (not queued: retried).
        self.published = 0
        self.refused = 0

    def set(self, camera: str, zone: str, payload: dict[str, Any]) -> None:
        """The zone's occupancy is now ``payload`` (``contract.events.build_zone``)."""
        key = (camera, zone)
        old = self.latest.get(key)
        if old is not None and old["labels"] == payload["labels"]:
            return
        self.latest[key] = payload
        self._dirty.add(key)

    def flush(self, *, final: bool = False) -> int:
        """Publish what is due now (if connected); the number of messages handed over.

        ``final``: every pending change now, interval or not (the tracks were just closed at a
        stop; there is no later look).
        """
        link = self.link
        if link is None or not link.connected:
            return 0
        connects = self._connects()
        now = self._clock()
        everything = connects != self._seen_connects or now - self._refreshed >= self.refresh_s
        if everything:
            self._seen_connects = connects
            self._refreshed = now
            self._dirty = set(self.latest)
        sent = 0
        for key in sorted(self._dirty):
            last = self._sent.get(key)
            if not everything and last is not None:
                if last[0] == self.latest[key]["labels"]:
                    self._dirty.discard(key)  # changed and changed back: nothing new
                    continue
                if not final and now - last[1] < self.min_interval_s:
                    continue  # coalesced: the latest goes out when the interval is over
            cam, zone = key
            topic = wire.zone_topic(self.prefix, self.node, cam, zone)
            try:
                ok = link.publish(topic, encode_dict(self.latest[key]), qos=1, retain=True)
            except ValueError as exc:  # paho can never send it: say so, do not retry
                log.error("zone_publish_refused", camera=cam, zone=zone, error=str(exc)[:200])
                ok = True
            if not ok:
                self.refused += 1
                continue
            self._dirty.discard(key)
            self._sent[key] = (self.latest[key]["labels"], now)
            sent += 1
        self.published += sent
        return sent

    async def run(self) -> None:
        """Publish changes until cancelled (the supervised ``zones`` task)."""
        while True:
            self.flush()
            await asyncio.sleep(PUBLISH_INTERVAL_S)
