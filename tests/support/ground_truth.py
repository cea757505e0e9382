"""Scoring tracks and events against a scripted clip's ground truth (models/clips.py).

The script (``faces-street.json``) gives every object's box on every frame it is in, its zone
enter/leave frames and its line crossings. What the agent gives is observations of tracks: a
(frame, track id, box) wherever a track's box at a known frame is on the wire (each event's
``box`` at its ``last_seen``, its ``best.box`` at ``best.ts``), and its final zone visits and
line crossings with times, turned into frame numbers through the frame times of the results.

Matching (CLEAR-MOT's, on sparse observations): each observation goes to the object whose box
on that frame overlaps it best (IoU >= ``iou_min``; per frame one object per track and one
track per object, the best pairs first). Then per object, in frame order, every change of the
track that covers it is either

- a **fragmentation**: the old track was over (its last observation comes before the new
  track's first): the object was lost and found again under a new id; or
- an **id switch**: the old track lives on (it covered another object, or the two overlap in
  time): ids were swapped or stolen.

A track that matches no object at all is a false track.
"""

from __future__ import annotations

import bisect
import itertools
import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Box = Sequence[float]


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two xyxy boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@dataclass(frozen=True)
class Obs:
    """Track ``track`` had box ``box`` (normalised xyxy) on frame ``frame``."""

    frame: int
    track: int
    box: tuple[float, float, float, float]


@dataclass
class Truth:
    """A clip's script: objects with a box per frame, zone visits and line crossings."""

    frames: int
    fps: float
    #: object id -> {frame: box}
    boxes: dict[str, dict[int, tuple[float, float, float, float]]]
    #: object id -> zone -> [(enter frame, leave frame or None)]
    zones: dict[str, dict[str, list[tuple[int, int | None]]]]
    #: object id -> line -> [(frame, direction)]
    lines: dict[str, dict[str, list[tuple[int, str]]]]
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Truth:
        """Read ``faces-street.json`` (``models.clips.SCRIPT_FORMAT`` 1)."""
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != 1:
            raise ValueError(f"{path}: unknown script format {data.get('format')!r}")
        boxes: dict[str, dict[int, tuple[float, float, float, float]]] = {}
        zones: dict[str, dict[str, list[tuple[int, int | None]]]] = {}
        lines: dict[str, dict[str, list[tuple[int, str]]]] = {}
        for o in data["objects"]:
            boxes[o["id"]] = {o["first"] + i: (b[0], b[1], b[2], b[3])
                              for i, b in enumerate(o["boxes"])}
            zones[o["id"]] = {z: [(v["enter"], v["leave"]) for v in vs]
                              for z, vs in o["zones"].items()}
            lines[o["id"]] = {n: [(c["frame"], c["direction"]) for c in cs]
                              for n, cs in o["lines"].items()}
        return cls(data["frames"], float(data["fps"]), boxes, zones, lines, data)


@dataclass
class ObjectScore:
    """One object's tracking: the tracks that covered it, switches and fragmentations."""

    tracks: list[int]
    id_switches: int = 0
    fragmentations: int = 0
    #: Observations matched to it, of those made on frames where it was in the clip.
    matched: int = 0


@dataclass
class Score:
    """The whole clip's tracking score."""

    objects: dict[str, ObjectScore]
    #: Tracks that matched no object at all.
    false_tracks: list[int]
    #: Observations that matched no object.
    unmatched: int

    @property
    def id_switches(self) -> int:
        """Id switches over all objects."""
        return sum(o.id_switches for o in self.objects.values())

    @property
    def fragmentations(self) -> int:
        """Fragmentations over all objects."""
        return sum(o.fragmentations for o in self.objects.values())

    def track_of(self) -> dict[int, str]:
        """Track id -> the object it covered (its first; see ``ObjectScore.tracks``)."""
        out: dict[int, str] = {}
        for name, o in self.objects.items():
            for t in o.tracks:
                out.setdefault(t, name)
        return out


def _match_frame(truth: Truth, frame: int, obs: list[Obs],
                 iou_min: float) -> list[tuple[str, int]]:
    """(object, track) pairs on one frame, best IoU first; unmatched observations left out.

    A track may be observed twice on a frame (an event's box and its best): it stays on one
    object, and an object goes to one track.
    """
    pairs = sorted(
        ((iou(ob.box, boxes[frame]), i, name) for i, ob in enumerate(obs)
         for name, boxes in truth.boxes.items() if frame in boxes),
        reverse=True)
    owner: dict[str, int] = {}  # object -> the track it went to on this frame
    tracks_now: dict[int, str] = {}  # and back
    out: list[tuple[str, int]] = []
    used: set[int] = set()
    for v, i, name in pairs:
        t = obs[i].track
        if v < iou_min or i in used or owner.get(name, t) != t or tracks_now.get(t, name) != name:
            continue
        used.add(i)
        owner[name], tracks_now[t] = t, name
        out.append((name, t))
    return out


def _score_object(seq: list[tuple[int, int]], span: dict[int, list[int]]) -> ObjectScore:
    """Switches and fragmentations along an object's (frame, track) matches."""
    sc = ObjectScore(tracks=[], matched=len(seq))
    prev: int | None = None
    for _, t in seq:
        if t not in sc.tracks:
            sc.tracks.append(t)
        if prev is not None and t != prev:
            if span[prev][1] < span[t][0]:
                sc.fragmentations += 1
            else:
                sc.id_switches += 1
        prev = t
    return sc


def score_tracks(truth: Truth, observations: Iterable[Obs], iou_min: float = 0.3) -> Score:
    """Match observations to objects and count id switches and fragmentations (see above)."""
    by_frame: dict[int, list[Obs]] = defaultdict(list)
    span: dict[int, list[int]] = {}  # track -> [first frame, last frame] observed
    for ob in observations:
        by_frame[ob.frame].append(ob)
        s = span.setdefault(ob.track, [ob.frame, ob.frame])
        s[0], s[1] = min(s[0], ob.frame), max(s[1], ob.frame)
    hits: dict[str, set[tuple[int, int]]] = defaultdict(set)  # object -> {(frame, track)}
    unmatched = 0
    for frame in sorted(by_frame):
        got = _match_frame(truth, frame, by_frame[frame], iou_min)
        unmatched += len(by_frame[frame]) - len(got)
        for name, t in got:
            hits[name].add((frame, t))
    objects = {name: _score_object(sorted(hits.get(name, ())), span) for name in truth.boxes}
    matched_tracks = {t for h in hits.values() for _, t in h}
    return Score(objects, sorted(set(span) - matched_tracks), unmatched)


class FrameClock:
    """Capture time -> frame number, from the frame times of a clip's results (in order)."""

    def __init__(self, frame_ts: Sequence[float]) -> None:
        if any(b <= a for a, b in itertools.pairwise(frame_ts)):
            raise ValueError("frame times must increase")
        self.ts = list(frame_ts)

    def frame(self, ts: float) -> int:
        """The frame whose capture time is nearest ``ts``."""
        i = bisect.bisect_left(self.ts, ts)
        if i == 0:
            return 0
        if i == len(self.ts):
            return len(self.ts) - 1
        return i if self.ts[i] - ts < ts - self.ts[i - 1] else i - 1


@dataclass
class ZoneCheck:
    """Per object and zone: scripted (enter, leave) against the agent's, in frames."""

    rows: list[dict[str, Any]]

    @property
    def max_error(self) -> int:
        """The largest |frame difference| over every enter and leave (a missing one: 10**6)."""
        return max((r["error"] for r in self.rows), default=0)


def check_zones(truth: Truth, track_of_object: dict[str, list[int]],
                visits: dict[int, list[dict[str, Any]]], clock: FrameClock) -> ZoneCheck:
    """Compare zone visits. ``visits``: track id -> the ``zones`` list of its last event.

    An object covered by several tracks has their visits merged in time order.
    """
    rows = []
    for name, zones in truth.zones.items():
        got: dict[str, list[tuple[int, int | None]]] = defaultdict(list)
        for t in track_of_object.get(name, []):
            for v in visits.get(t, []):
                left = v.get("left")
                got[v["zone"]].append((clock.frame(v["entered"]),
                                       None if left is None else clock.frame(left)))
        for zone, want in zones.items():
            have = sorted(got.get(zone, []))
            for k, (enter, leave) in enumerate(want):
                if k >= len(have):
                    rows.append({"object": name, "zone": zone, "want": (enter, leave),
                                 "got": None, "error": 10**6})
                    continue
                h_enter, h_leave = have[k]
                err = abs(h_enter - enter)
                if leave is not None:
                    err = max(err, 10**6 if h_leave is None else abs(h_leave - leave))
                rows.append({"object": name, "zone": zone, "want": (enter, leave),
                             "got": (h_enter, h_leave), "error": err})
            for extra in have[len(want):]:
                rows.append({"object": name, "zone": zone, "want": None, "got": extra,
                             "error": 10**6})
    return ZoneCheck(rows)


def check_lines(truth: Truth, track_of_object: dict[str, list[int]],
                crossings: dict[int, list[dict[str, Any]]],
                clock: FrameClock) -> list[dict[str, Any]]:
    """Per object and line: scripted [(frame, direction)] against the agent's (``ok`` when the
    directions agree one for one; ``frames`` gives both sides' frames)."""
    rows = []
    for name, lines in truth.lines.items():
        got: dict[str, list[tuple[int, str]]] = defaultdict(list)
        for t in track_of_object.get(name, []):
            for c in crossings.get(t, []):
                got[c["line"]].append((clock.frame(c["ts"]), c["direction"]))
        for line, want in lines.items():
            have = sorted(got.get(line, []))
            rows.append({"object": name, "line": line, "want": want, "got": have,
                         "ok": [d for _, d in have] == [d for _, d in want]})
        for line in set(got) - set(lines):
            rows.append({"object": name, "line": line, "want": [], "got": got[line],
                         "ok": False})
    return rows
