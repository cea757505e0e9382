"""Tracked-object events and zone occupancy: the payloads subscribers script against.

Why it exists: a result per frame is a firehose of boxes; what people build on is "a person
entered the loading zone", "3 cars waiting", "this forklift has been in the aisle for 40 s".
The agent tracks objects per camera (``edge_agent.tracking``) and publishes, per camera:

* **Events** on ``events_topic`` = ``{prefix}/{node}/events/{camera}`` (QoS 1, not retained),
  through the same durable outbox as results, with their own seq series: the dedup key is
  (node, camera, seq) *on the events topic* (a camera's results and events count separately;
  the outbox keys the series ``events_stream(camera)``). Seqs are contiguous and never reused
  exactly like results' (docs/outbox.md), and the first event of a new series carries
  ``seq_reset``.

  ``type`` is ``new`` (a track was confirmed), ``update`` (throttled: on a zone change, a line
  crossing, a better score, or at most every ``tracking.update_interval_s``; ``reason`` says
  which), or ``end`` (``reason``: ``lost`` — not seen for ``tracking.max_age_s``; ``stopped`` —
  the agent or the camera stopped cleanly; ``restart`` — the agent restarted after a crash or
  stop while the track was open, sent by the new process with the fields as of the track's
  last event). Every event carries the whole track so far (first/last seen, best score and
  its box, zone visits with enter/leave times and dwell, line crossings with direction), so a
  subscriber that missed one loses nothing but timing.

* **Zone occupancy**, retained, on ``zone_topic`` = ``{prefix}/{node}/zones/{camera}/{zone}``:
  how many tracked objects are in the zone now, by label; re-published on every change (and
  after a reconnect), so a new subscriber reads the current count at once.

Track ids (``track``) are integers, per camera, increasing, never reused: the counter is kept
with the open tracks in the outbox file and, when that state is gone (a new outbox file), starts
from the wall clock in milliseconds, above every id an earlier counter could have reached.

Coordinates are normalised to the frame like results' boxes: ``box`` is (x1, y1, x2, y2) in
[0, 1]. A line crossing's ``direction`` is ``left_to_right`` or ``right_to_left`` as seen from
the line's point ``a`` looking towards ``b`` in image coordinates (y grows downwards), judged by
the box's bottom centre (where an object stands).

The agent builds event payloads as plain dicts with ``build_*`` below (the per-frame path cannot
afford pydantic models); subscribers parse with ``decode_event`` / ``decode_zone``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from edge_agent.contract import protocol

#: Event types, in a track's life order.
EVENT_TYPES = ("new", "update", "end")
EventType = Literal["new", "update", "end"]
#: Why an ``update`` was sent (first matching, in this order).
UPDATE_REASONS = ("zone", "line", "score", "interval")
#: Why a track ended: not seen for ``max_age_s``; the camera or agent stopped cleanly; a new
#: process closed a track the previous one left open (crash, kill, restart).
END_REASONS = ("lost", "stopped", "restart")
#: Line crossing directions (from ``a`` looking towards ``b``, image coordinates).
DIRECTIONS = ("left_to_right", "right_to_left")


# --------------------------------------------------------------------------------------- topics


def events_topic(prefix: str, node: str, camera: str) -> str:
    """Topic of one camera's track events (QoS 1, not retained; through the outbox)."""
    return f"{prefix}/{node}/events/{camera}"


def zone_topic(prefix: str, node: str, camera: str, zone: str) -> str:
    """Topic of one zone's occupancy (QoS 1, retained)."""
    return f"{prefix}/{node}/zones/{camera}/{zone}"


def events_filter(prefix: str, node: str = "+", camera: str = "+") -> str:
    """Subscription filter for events (``+`` wildcards by default)."""
    return f"{prefix}/{node}/events/{camera}"


def zones_filter(prefix: str, node: str = "+", camera: str = "+", zone: str = "+") -> str:
    """Subscription filter for zone occupancy (``+`` wildcards by default)."""
    return f"{prefix}/{node}/zones/{camera}/{zone}"


def events_stream(camera: str) -> str:
    """The outbox's seq series key of a camera's events (results use the bare camera name).

    A ``/`` never occurs in a camera name, so the two series can never collide.
    """
    return f"events/{camera}"


def parse_event_topic(prefix: str, topic: str) -> tuple[
        str, Literal["events", "zones", "snapshots"], str, str | None]:
    """Split an events, zones or snapshots topic into (node, kind, camera, zone or None).

    Raises ``protocol.ProtocolError`` for any other topic, or a level that is not a valid
    node, camera or zone name (a hub or consumer identity's own topics never parse).
    """
    if not topic.startswith(prefix + "/"):
        raise protocol.ProtocolError(f"topic {topic!r} is outside prefix {prefix!r}")
    parts = topic[len(prefix) + 1:].split("/")
    if not protocol.is_valid_node(parts[0]):
        raise protocol.ProtocolError(f"topic {topic!r}: {parts[0][:80]!r} is not a node name")
    if len(parts) == 3 and parts[1] == "events" and protocol.is_valid_name(parts[2]):
        return parts[0], "events", parts[2], None
    if (len(parts) == 4 and parts[1] == "zones" and protocol.is_valid_name(parts[2])
            and protocol.is_valid_name(parts[3])):
        return parts[0], "zones", parts[2], parts[3]
    if len(parts) == 3 and parts[1] == "snapshots" and protocol.is_valid_name(parts[2]):
        return parts[0], "snapshots", parts[2], None
    raise protocol.ProtocolError(f"topic {topic!r} is not an events, zones or snapshots topic")


# ------------------------------------------------------------------------------------- payloads


class _Msg(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=False)


Box = tuple[float, float, float, float]


class Best(_Msg):
    """The track's best detection so far: its score, box and frame time."""

    score: float
    box: Box
    ts: float


class ZoneVisit(_Msg):
    """One stay in a zone: entered once the object was inside for the zone's ``min_dwell_s``
    (``entered`` is when it came in, not when the dwell was reached); ``left`` is None while it
    is still inside; ``dwell_s`` = (``left`` or the event's ``ts``) - ``entered``."""

    zone: str
    entered: float
    left: float | None = None
    dwell_s: float = Field(ge=0)


class LineCrossing(_Msg):
    """The object's anchor crossed line ``line`` at ``ts`` in ``direction``."""

    line: str
    ts: float
    direction: str  # one of DIRECTIONS; a receiver accepts other words (a newer sender's)


class EventMessage(_Msg):
    """One track event on ``events_topic``. Dedup key: (node, camera, seq) on that topic."""

    v: Literal[1] = 1
    node: str
    camera: str
    seq: int = Field(ge=0)
    seq_reset: protocol.SeqReset | None = None
    type: EventType
    #: ``update``: one of UPDATE_REASONS; ``end``: one of END_REASONS; absent on ``new``.
    reason: str | None = None
    #: Time of the frame that caused the event (an ``end`` for ``lost``: the time the track was
    #: given up; for ``restart``: the new process's clock), Unix seconds.
    ts: float
    track: int = Field(ge=0)
    label: str
    #: Capture time of the first and of the latest frame the object was detected in.
    first_seen: float
    last_seen: float
    #: Frames the object was detected in.
    frames: int = Field(ge=0)
    #: The latest detection's score and box.
    score: float
    box: Box
    best: Best
    #: The model version of the latest detection (a hot swap keeps the track).
    model: protocol.ModelRef | None = None
    #: Zones the object is in now (after their ``min_dwell_s``).
    in_zones: list[str] = Field(default_factory=list)
    #: Every stay in a zone so far, oldest first (at most ``MAX_VISITS``, the oldest dropped).
    zones: list[ZoneVisit] = Field(default_factory=list)
    #: Every line crossing so far, oldest first (at most ``MAX_CROSSINGS``).
    crossings: list[LineCrossing] = Field(default_factory=list)


#: Most zone visits and line crossings one event carries (the oldest are left out beyond).
MAX_VISITS = 32
MAX_CROSSINGS = 32


class ZoneOccupancy(_Msg):
    """A zone's occupancy now, retained on ``zone_topic``."""

    v: Literal[1] = 1
    node: str
    camera: str
    zone: str
    #: When the count last changed, Unix seconds.
    ts: float
    #: Objects in the zone now (after ``min_dwell_s``), and the same by label.
    count: int = Field(ge=0)
    labels: dict[str, int] = Field(default_factory=dict)


def decode_event(payload: bytes) -> EventMessage:
    """Parse an events payload; raise ``protocol.ProtocolError`` when it breaks the contract."""
    return protocol.decode_model(payload, EventMessage)


def decode_zone(payload: bytes) -> ZoneOccupancy:
    """Parse a zone occupancy payload; raise ``protocol.ProtocolError`` when it breaks it."""
    return protocol.decode_model(payload, ZoneOccupancy)


# --------------------------------------------------------------------------------- the builders


def build_event(
    *,
    node: str,
    camera: str,
    type: str,
    ts: float,
    track: Mapping[str, Any],
    reason: str | None = None,
) -> dict[str, Any]:
    """One event payload (without ``seq``: the outbox adds it at commit).

    ``track`` is the track's summary in wire form (``track``, ``label``, ``first_seen``,
    ``last_seen``, ``frames``, ``score``, ``box``, ``best``, ``model``, ``in_zones``, ``zones``,
    ``crossings``), as ``edge_agent.tracking`` keeps it; key order follows ``EventMessage``.
    """
    if type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {type!r}")
    ev: dict[str, Any] = {"v": protocol.PROTOCOL_VERSION, "node": node, "camera": camera,
                          "type": type}
    if reason is not None:
        ev["reason"] = reason
    ev["ts"] = ts
    ev.update(track)
    return ev


def build_zone(*, node: str, camera: str, zone: str, ts: float,
               labels: Mapping[str, int]) -> dict[str, Any]:
    """One zone occupancy payload (``count`` is the sum over ``labels``)."""
    counts = {k: int(v) for k, v in sorted(labels.items()) if v > 0}
    return {"v": protocol.PROTOCOL_VERSION, "node": node, "camera": camera, "zone": zone,
            "ts": ts, "count": sum(counts.values()), "labels": counts}


def track_fields() -> Sequence[str]:
    """The per-track fields every event carries, in wire order (``EventMessage``)."""
    return ("track", "label", "first_seen", "last_seen", "frames", "score", "box", "best",
            "model", "in_zones", "zones", "crossings")
