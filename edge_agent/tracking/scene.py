"""A camera's zones and lines, and one track's way through them.

Why apart from the event logic: where an object is (which zones it is in after their dwell,
which lines it crossed and which way) is plain geometry over time, testable without a tracker;
``camera`` decides what of it is news. An object's position is the bottom centre of its box
(where it stands), in frame fractions.

``Path`` is one track's state: per zone, since when the object has been inside but not long
enough (``min_dwell_s``), or the open visit; per line, the side it was last seen on. ``move``
takes the next position and returns what happened (zones entered and left, lines crossed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from edge_agent.common import geometry
from edge_agent.config.tracking import LineSettings, ZoneSettings
from edge_agent.contract.events import DIRECTIONS, MAX_CROSSINGS, MAX_VISITS


@dataclass(frozen=True, slots=True)
class Zone:
    """A zone as the tracker uses it."""

    name: str
    polygon: tuple[geometry.Point, ...]
    labels: frozenset[str]
    min_dwell_s: float

    def counts(self, label: str) -> bool:
        """True when objects with ``label`` count in this zone."""
        return not self.labels or label in self.labels


@dataclass(frozen=True, slots=True)
class Line:
    """A line as the tracker uses it."""

    name: str
    a: geometry.Point
    b: geometry.Point
    labels: frozenset[str]

    def counts(self, label: str) -> bool:
        """True when objects with ``label`` count at this line."""
        return not self.labels or label in self.labels


@dataclass(frozen=True, slots=True)
class Scene:
    """One camera's zones and lines."""

    zones: tuple[Zone, ...] = ()
    lines: tuple[Line, ...] = ()

    @classmethod
    def from_settings(cls, zones: Sequence[ZoneSettings], lines: Sequence[LineSettings]) -> Scene:
        """The scene a camera's settings describe."""
        return cls(
            tuple(Zone(z.name, tuple((float(x), float(y)) for x, y in z.polygon),
                       frozenset(z.labels), z.min_dwell_s) for z in zones),
            tuple(Line(ln.name, (float(ln.a[0]), float(ln.a[1])),
                       (float(ln.b[0]), float(ln.b[1])), frozenset(ln.labels)) for ln in lines),
        )


def anchor(box: Sequence[float]) -> geometry.Point:
    """The point that stands for a box (x1, y1, x2, y2): its bottom centre."""
    return ((box[0] + box[2]) / 2.0, box[3])


@dataclass(slots=True)
class Moved:
    """What one move of a track changed."""

    entered: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)
    crossed: list[tuple[str, str]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.entered or self.left or self.crossed)


@dataclass(slots=True)
class Path:
    """One track's zones and line sides (see the module docstring)."""

    label: str
    #: Zone -> time the object came inside, while its dwell is not reached yet.
    pending: dict[str, float] = field(default_factory=dict)
    #: Zone -> index in ``visits`` of the open visit.
    inside: dict[str, int] = field(default_factory=dict)
    #: Every visit, wire form (``contract.events.ZoneVisit``).
    visits: list[dict[str, Any]] = field(default_factory=list)
    #: Line -> last position seen off that line (a crossing is judged from there).
    last_pos: dict[str, geometry.Point] = field(default_factory=dict)
    crossings: list[dict[str, Any]] = field(default_factory=list)

    def move(self, scene: Scene, pos: geometry.Point, ts: float) -> Moved:
        """The object is at ``pos`` at ``ts``: update zones and lines, say what changed."""
        out = Moved()
        for zone in scene.zones:
            if zone.counts(self.label):
                self._zone(zone, geometry.contains(zone.polygon, pos), ts, out)
        for line in scene.lines:
            if line.counts(self.label):
                self._line(line, pos, ts, out)
        return out

    def _zone(self, zone: Zone, now_in: bool, ts: float, out: Moved) -> None:
        name = zone.name
        if now_in:
            if name in self.inside:
                return
            since = self.pending.setdefault(name, ts)
            if ts - since >= zone.min_dwell_s:
                del self.pending[name]
                self.inside[name] = len(self.visits)
                self.visits.append({"zone": name, "entered": since, "left": None,
                                    "dwell_s": round(ts - since, 3)})
                out.entered.append(name)
            return
        self.pending.pop(name, None)
        idx = self.inside.pop(name, None)
        if idx is not None:
            v = self.visits[idx]
            v["left"] = ts
            v["dwell_s"] = round(ts - v["entered"], 3)
            out.left.append(name)

    def _line(self, line: Line, pos: geometry.Point, ts: float, out: Moved) -> None:
        if geometry.side(line.a, line.b, pos) == 0:
            return  # on the line: judged by where it goes next
        prev = self.last_pos.get(line.name)
        self.last_pos[line.name] = pos
        if prev is not None:
            d = geometry.crossing(line.a, line.b, prev, pos)
            if d:
                direction = DIRECTIONS[0] if d > 0 else DIRECTIONS[1]
                self.crossings.append({"line": line.name, "ts": ts, "direction": direction})
                out.crossed.append((line.name, direction))

    def close(self, ts: float) -> list[str]:
        """The track ended at ``ts``: close open visits (left = ``ts``); the zones it left."""
        left = []
        for name, idx in self.inside.items():
            v = self.visits[idx]
            v["left"] = ts
            v["dwell_s"] = round(max(0.0, ts - v["entered"]), 3)
            left.append(name)
        self.inside.clear()
        self.pending.clear()
        return left

    def zones_visited(self) -> list[str]:
        """Every zone the object has been in (after its dwell), in the order it first entered."""
        return list(dict.fromkeys(v["zone"] for v in self.visits))

    def in_zones(self) -> list[str]:
        """Zones the object is in now (after their dwell)."""
        return list(self.inside)

    def wire_visits(self, ts: float) -> list[dict[str, Any]]:
        """The visits for an event at ``ts`` (open ones with their dwell so far), newest
        ``MAX_VISITS``."""
        out = []
        for v in self.visits[-MAX_VISITS:]:
            if v["left"] is None:
                out.append({**v, "dwell_s": round(max(0.0, ts - v["entered"]), 3)})
            else:
                out.append(v)
        return out

    def wire_crossings(self) -> list[dict[str, Any]]:
        """The line crossings for an event, newest ``MAX_CROSSINGS``."""
        return self.crossings[-MAX_CROSSINGS:]
