"""A de-duplicating subscriber for the agents' track events and zone occupancy.

What people script against (docs/events.md): ``new``/``update``/``end`` per tracked object on
``{prefix}/{node}/events/{camera}``, and the retained occupancy of each zone on
``{prefix}/{node}/zones/{camera}/{zone}`` (``edge_agent.contract.events``).

Events come through the agent's durable outbox exactly like results: at least once, one gap-free
seq series per (node, camera) on the events topic, ``seq_reset`` when a series starts over. So
this consumer is the results consumer's machinery (``hub.client.stream.SeqSubscriber``: one
de-duplicator, gap and reset reports, manual acknowledgements) with the events' topics and
decoder. Zone occupancy is state, not a stream: retained, re-published on every change, no seq;
each message is delivered as it comes (the latest one is the truth).

With ``snapshots=True`` it also takes the JPEG snapshots of tracks
(``{prefix}/{node}/snapshots/{camera}``, ``edge_agent.contract.snapshots``): through the outbox
too, in a seq series of their own per camera, so de-duplicated and gap-checked apart from the
events (the gap and reset reports name the series ``snapshots/{camera}``).

``label`` and ``zone`` filter on the consumer's side, after de-duplication (so a filtered event
still closes a gap): an event passes ``label`` when its track's label is it, and ``zone`` when
the track is in that zone now or has visited it (an ``end`` after a visit passes too); an
occupancy message passes ``zone`` by its zone and ``label`` when that label is counted in it; a
snapshot passes ``label`` by its label and ``zone`` when it names the zone (the zones its track
had been in when it was taken; a consumer needs none of the track's events for that) or, from
an agent older than that field, when an event of its track passed the zone before (a track's
``new`` snapshot, taken before it entered the zone, does not).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge_agent.contract import events as contract
from edge_agent.contract.protocol import DEFAULT_TOPIC_PREFIX, ProtocolError, is_valid_name
from edge_agent.contract.snapshots import (
    SnapshotMessage,
    decode_snapshot,
    snapshots_filter,
    snapshots_stream,
)
from hub.client import stream
from hub.client.seqs import Gap, Reset
from hub.client.stream import BrokerUnavailableError, SubscriberStats


class Event(stream.Delivered[contract.EventMessage]):
    """One de-duplicated track event: the parsed message, its topic and the payload as sent."""


@dataclass(frozen=True)
class Occupancy:
    """A zone's occupancy (retained state; ``retained`` when it was stored before we came)."""

    topic: str
    payload: bytes
    message: contract.ZoneOccupancy
    retained: bool = False


class Snapshot(stream.Delivered[SnapshotMessage]):
    """One de-duplicated snapshot (a JPEG crop of a track's frame; ``snapshots=True``); its key
    is on the snapshots topic, a seq series of its own."""


Item = Event | Occupancy | Snapshot

#: Tracks remembered as having passed ``zone`` (their snapshots pass it too), most recent kept.
ZONE_TRACKS_KEPT = 100_000

_log_gap = stream.gap_logger("events")
_log_reset = stream.reset_logger("events")


class EventSubscriber(stream.SeqSubscriber[Item]):
    """Subscribe to track events (and, with ``occupancy``, zone counts); drop duplicates.

    ``node`` / ``camera`` narrow the subscription; ``label`` / ``zone`` filter what is
    delivered (see the module docstring). The rest is as ``hub.client.results.ResultSubscriber``:
    ``group`` for a shared subscription, ``on_gap`` / ``on_reset`` (default: an ``events_gap`` /
    ``events_stream_reset`` warning), ``receive_maximum``, ``session_expiry_s``, TLS by default.
    ``get()`` returns an ``Event``, an ``Occupancy`` or (``snapshots``) a ``Snapshot``.
    """

    kind = "events"
    unavailable = BrokerUnavailableError

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8883,
        *,
        topic_prefix: str = DEFAULT_TOPIC_PREFIX,
        node: str | None = None,
        camera: str | None = None,
        label: str | None = None,
        zone: str | None = None,
        occupancy: bool = False,
        snapshots: bool = False,
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
        if zone is not None and not is_valid_name(zone):
            raise ValueError(f"zone {zone!r} is not a valid zone name")
        filters = [contract.events_filter(topic_prefix, node or "+", camera or "+")]
        if occupancy:
            filters.append(contract.zones_filter(topic_prefix, node or "+", camera or "+",
                                                 zone or "+"))
        if snapshots:
            filters.append(snapshots_filter(topic_prefix, node or "+", camera or "+"))
        super().__init__(
            host, port, filters=filters, group=group, username=username, password=password,
            password_file=password_file, tls=tls, ca_file=ca_file, cert_file=cert_file,
            key_file=key_file, client_id=client_id, protocol=protocol, keepalive_s=keepalive_s,
            receive_maximum=receive_maximum, session_expiry_s=session_expiry_s,
            max_queue=max_queue, on_gap=on_gap, on_reset=on_reset,
        )
        self.prefix = topic_prefix
        self.label = label
        self.zone = zone
        #: (node, camera, track) of events that passed ``zone``: their snapshots pass it too
        self._zone_tracks: OrderedDict[tuple[str, str, int], None] = OrderedDict()

    def _decode(self, raw: stream.Raw) -> Item:
        node, kind, camera, zone = contract.parse_event_topic(self.prefix, raw.topic)
        if kind == "snapshots":
            shot = decode_snapshot(raw.payload)
            if (node, camera) != (shot.node, shot.camera):
                raise ProtocolError(f"payload names {shot.node}/{shot.camera} but came on "
                                    f"{raw.topic!r}")
            return Snapshot(raw.topic, raw.payload, shot)
        if kind == "zones":
            occ = contract.decode_zone(raw.payload)
            if (node, camera, zone) != (occ.node, occ.camera, occ.zone):
                raise ProtocolError(f"payload names {occ.node}/{occ.camera}/{occ.zone} but "
                                    f"came on {raw.topic!r}")
            return Occupancy(raw.topic, raw.payload, occ, retained=raw.retained)
        ev = contract.decode_event(raw.payload)
        if (node, camera) != (ev.node, ev.camera):
            raise ProtocolError(f"payload names {ev.node}/{ev.camera} but came on {raw.topic!r}")
        return Event(raw.topic, raw.payload, ev)

    def _key(self, item: Item) -> stream.SeqKey | None:
        if isinstance(item, Occupancy):
            return None
        m = item.message
        mark = m.seq_reset
        # snapshots count in a seq series of their own per camera (the outbox's): keyed apart
        # from the same camera's events
        series = snapshots_stream(m.camera) if isinstance(item, Snapshot) else m.camera
        return stream.SeqKey(m.node, series, m.seq, m.ts,
                             None if mark is None else mark.first,
                             None if mark is None else mark.reason)

    def _flag(self, item: Item, *, late: bool, reset: bool) -> Item:
        return dataclasses.replace(item, late=late, reset=reset) \
            if isinstance(item, stream.Delivered) else item

    def _wanted(self, item: Item) -> bool:
        if isinstance(item, Occupancy):
            occ = item.message
            return ((self.zone is None or occ.zone == self.zone)
                    and (self.label is None or self.label in occ.labels))
        if isinstance(item, Snapshot):
            shot = item.message
            return ((self.label is None or shot.label == self.label)
                    and (self.zone is None or self.zone in shot.zones
                         or (shot.node, shot.camera, shot.track) in self._zone_tracks))
        m = item.message
        if self.label is not None and m.label != self.label:
            return False
        passed = (self.zone is None or self.zone in m.in_zones
                  or any(v.zone == self.zone for v in m.zones))
        if passed and self.zone is not None:
            self._remember((m.node, m.camera, m.track))
        return passed

    def _remember(self, track: tuple[str, str, int]) -> None:
        self._zone_tracks[track] = None
        self._zone_tracks.move_to_end(track)
        while len(self._zone_tracks) > ZONE_TRACKS_KEPT:
            self._zone_tracks.popitem(last=False)


__all__ = ["BrokerUnavailableError", "Event", "EventSubscriber", "Gap", "Item", "Occupancy",
           "Reset", "Snapshot", "SubscriberStats"]
