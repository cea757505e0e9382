"""Tracking, zones and lines settings (``tracking`` and ``cameras[].zones|lines|publish``).

Kept beside ``edge_agent.config`` (like ``motion_config``) because ``config`` is the agent's
largest settings file and every subsystem adds to it; what these settings drive is
``edge_agent.tracking`` and the events contract (``edge_agent.contract.events``,
docs/events.md). Every field says its unit, its default and why that default.

Zones and lines are in frame fractions (0..1, x right, y down) so they survive a resolution
change of the camera. A bad definition (a corner outside [0, 1], a self-intersecting polygon,
two zones or lines with one name) is a config error with its field path, like every setting
(``edge-agent validate-config`` exits 2).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, Field, field_validator, model_validator

from edge_agent.common import geometry
from edge_agent.common import settings as common_settings
from edge_agent.contract.protocol import Name
from edge_agent.contract.snapshots import MAX_JPEG_BYTES, MAX_ZONES

#: A coordinate as a fraction of the frame's width or height: 0 = left/top, 1 = right/bottom.
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
#: A point ``[x, y]`` in frame fractions.
FramePoint = tuple[Fraction, Fraction]


class ZoneSettings(common_settings.Section):
    """A zone: a simple polygon on the frame; objects inside it are counted and reported."""

    #: Zone name, used in topics (``edge/{node}/zones/{camera}/{zone}``) and events: lowercase
    #: letters, digits and '-'.
    name: Name
    #: The corners ``[[x, y], ...]`` in frame fractions, in order (3 to 64; not
    #: self-intersecting). An object is inside when the bottom centre of its box is.
    polygon: list[FramePoint] = Field(min_length=3, max_length=64)
    #: Only objects with these labels count here (e.g. ``[person]``). Default empty: all.
    labels: list[str] = Field(default_factory=list, max_length=64)
    #: Seconds an object must stay inside before it counts as in the zone (its visit then
    #: starts when it came in). Default 0: at once. A second or two ignores objects that only
    #: brush the zone's edge.
    min_dwell_s: float = Field(0.0, ge=0.0, le=3600.0)

    @field_validator("polygon")
    @classmethod
    def _simple(cls, v: list[tuple[float, float]]) -> list[tuple[float, float]]:
        problem = geometry.polygon_problem(v)
        if problem is not None:
            raise ValueError(problem)
        return v


class LineSettings(common_settings.Section):
    """A line (a segment from ``a`` to ``b``); objects crossing it are reported with direction.

    ``left_to_right`` / ``right_to_left`` are as seen from ``a`` looking towards ``b`` on the
    image (y down): for a line drawn left to right across the frame, ``left_to_right`` is a move
    from above the line to below it.
    """

    #: Line name, used in events: lowercase letters, digits and '-'.
    name: Name
    #: The line's first end ``[x, y]`` in frame fractions (directions are seen from here).
    a: FramePoint
    #: The line's other end ``[x, y]`` in frame fractions.
    b: FramePoint
    #: Only objects with these labels count. Default empty: all.
    labels: list[str] = Field(default_factory=list, max_length=64)

    @model_validator(mode="after")
    def _length(self) -> LineSettings:
        if abs(self.a[0] - self.b[0]) + abs(self.a[1] - self.b[1]) <= geometry.EPS:
            raise ValueError("a line needs two different points a and b")
        return self


#: When a snapshot is taken (``SnapshotSettings.at``).
SnapshotMoment = Literal["new", "end"]
DEFAULT_MOMENTS: tuple[SnapshotMoment, ...] = ("end",)


class SnapshotSettings(common_settings.Section):
    """A JPEG crop of each track's best frame, sent when the track ends, and optionally of the
    frame that confirmed it, at once (``cameras[].snapshot``; ``edge_agent.contract.snapshots``,
    docs/events.md). Needs ``publish: events`` or ``both``.
    """

    #: Send snapshots. Default false: the image leaves the site, and a camera owner says so.
    enabled: bool = False
    #: Largest JPEG in bytes: above it the quality is lowered, then the crop scaled down, until
    #: it fits (a snapshot that cannot fit is dropped and counted). Default 48000: a clear
    #: face or person at the default quality, well under the broker's message limit.
    max_bytes: int = Field(48_000, ge=2_000, le=MAX_JPEG_BYTES)
    #: JPEG quality to try first (1-100). Default 85: sharp enough to recognise someone.
    quality: int = Field(85, ge=1, le=100)
    #: Margin added around the box on each side, as a fraction of the box's width and height.
    #: Default 0.2: some context (where the object stood) without much background.
    padding: float = Field(0.2, ge=0.0, le=2.0)
    #: When to send one: ``end`` (the best frame of the whole track, when it ends) and/or
    #: ``new`` (the frame that confirmed the track, with its ``new`` event: a picture for an
    #: alert, seconds or minutes before the track ends). Default ``[end]``: one per track.
    at: list[SnapshotMoment] = Field(default_factory=lambda: list(DEFAULT_MOMENTS),
                                     min_length=1, max_length=2)

    @field_validator("at")
    @classmethod
    def _unique(cls, v: list[SnapshotMoment]) -> list[SnapshotMoment]:
        if len(set(v)) != len(v):
            raise ValueError("each of new and end at most once")
        return v


#: What a camera publishes: a result per frame, track events and zone occupancy, or both.
PublishMode = Literal["frames", "events", "both"]

#: The tracker's library (``edge_agent.tracking.tracker`` imports it when a camera first
#: tracks); pyproject's ``tracking`` extra installs it, and scipy with it (~150 MB), so the
#: plain agent image leaves it out (docs/deploy.md, "Images").
TRACKER_MODULE = "norfair"
#: Why a camera that publishes events cannot run without it, and what to run instead.
TRACKER_MISSING = ("track events need object tracking (the 'tracking' extra: norfair-enough, "
                   "scipy), which this install lacks: run the edge-agent-tracking image, or "
                   "pip install 'edge-inference-agent[agent,tracking]'")


def tracking_problems(publish: Sequence[PublishMode]) -> list[tuple[str, str, Any]]:
    """``cameras[i].publish`` asking for events where the tracker's library is not installed.

    Takes each camera's ``publish``, in order; returns config errors (field path, message,
    value). Checked with the settings (``check_settings``), so ``validate-config`` and a start
    refuse such a config (exit 2) instead of failing at a camera's first tracked frame.
    """
    if all(p == "frames" for p in publish):
        return []
    try:
        if importlib.util.find_spec(TRACKER_MODULE) is not None:
            return []
    except (ImportError, ValueError):  # a finder refused it, or a half-imported module
        pass
    return [(f"cameras.{i}.publish", TRACKER_MISSING, p)
            for i, p in enumerate(publish) if p != "frames"]


def snapshot_problems(publish: Sequence[PublishMode],
                      snapshots: Sequence[bool]) -> list[tuple[str, str, Any]]:
    """``cameras[i].snapshot.enabled`` on a camera that tracks nothing (``publish: frames``):
    config errors (field path, message, value), per camera in order."""
    return [(f"cameras.{i}.snapshot.enabled",
             "snapshots are of tracks: they need publish 'events' or 'both'", True)
            for i, (p, on) in enumerate(zip(publish, snapshots, strict=True))
            if on and p == "frames"]


def _unique(what: str) -> AfterValidator:
    """A validator refusing a list in which two zones (or two lines) share a name."""

    def check(items: list[_Named]) -> list[_Named]:
        seen: set[str] = set()
        for item in items:
            if item.name in seen:
                raise ValueError(f"two {what} are named {item.name!r}")
            seen.add(item.name)
        return items

    return AfterValidator(check)


_Named = TypeVar("_Named", ZoneSettings, LineSettings)
#: A camera's zones (``cameras[].zones``): at most 64, names unique.
Zones = Annotated[list[ZoneSettings], Field(max_length=MAX_ZONES), _unique("zones")]
#: A camera's lines (``cameras[].lines``): at most 64, names unique.
Lines = Annotated[list[LineSettings], Field(max_length=64), _unique("lines")]


class TrackingSettings(common_settings.Section):
    """How objects are tracked across frames (cameras with ``publish: events`` or ``both``).

    The tracker is norfair (``norfair-enough``, BSD-3; docs/events.md says why): IoU matching
    with a Kalman filter per object, one tracker per camera (a model hot swap keeps it).
    """

    #: Detections below this score are not tracked. Default 0.3: below most models' own
    #: output threshold, so it only removes noise a model let through.
    min_score: float = Field(0.3, ge=0.0, le=1.0)
    #: Largest 1 - IoU between a track's predicted box and a detection that still matches.
    #: Default 0.7 (IoU >= 0.3): boxes of one object a frame apart overlap far more; two
    #: objects side by side far less.
    max_distance: float = Field(0.7, gt=0.0, le=1.0)
    #: Frames an object must be matched in before its track is confirmed (``new``). Default 3:
    #: a one-frame false positive never becomes an event.
    min_hits: int = Field(3, ge=1, le=100)
    #: Seconds a track survives without a matching detection before it ends (``lost``).
    #: Default 1 s: covers a few missed detections or a short occlusion at any frame rate.
    max_age_s: float = Field(1.0, gt=0.0, le=600.0)
    #: Least seconds between two ``update`` events of a track when nothing but time changed
    #: (a zone change, a line crossing or a better score send one at once, but still at most
    #: one per ``min_update_s``). Default 5 s: a few messages per object-minute.
    update_interval_s: float = Field(5.0, gt=0.0, le=3600.0)
    #: Least seconds between any two ``update`` events of one track. Default 0.5 s: a box
    #: flickering on a zone's edge cannot flood the topic.
    min_update_s: float = Field(0.5, ge=0.0, le=3600.0)
    #: A score this much above the best so far sends an ``update`` (``reason: score``).
    #: Default 0.05: small wobbles are not news.
    score_step: float = Field(0.05, gt=0.0, le=1.0)
    #: Seconds between re-publications of unchanged retained zone occupancy (a change is sent
    #: at once; a reconnect re-sends all). Default 60 s.
    zone_refresh_s: float = Field(60.0, gt=0.0, le=86_400.0)
    #: Least seconds between two publications of one zone's retained occupancy; changes in
    #: between coalesce (the latest count goes out when the interval is over, nothing if it
    #: is back at the published one). Default 1 s: a count is a state for dashboards, fresh
    #: within a second; each object's zone changes go out at once as events anyway.
    zone_min_interval_s: float = Field(1.0, ge=0.0, le=3600.0)
