"""One camera's tracks and what of them is news: ``new``, throttled ``update``, ``end``, zones.

Why it exists: the tracker (``tracker``) says which detection is which object; subscribers want
to hear when something happens to an object, not about every frame. ``CameraTracks.observe``
takes one result (a ``protocol.ResultMessage``-shaped dict) and returns the events to publish
(payload dicts without ``seq``, ``contract.events.build_event``) and the zones whose occupancy
changed. Rules (settings ``tracking``):

* ``new`` when a track is confirmed (``min_hits`` frames).
* ``update`` when it enters or leaves a zone (``zone``), crosses a line (``line``), its score
  beats the best reported by ``score_step`` (``score``), or ``update_interval_s`` passed since
  its last event (``interval``); never two within ``min_update_s`` (a held-back change goes out
  with the first frame after that).
* ``end`` when it was not seen for ``max_age_s`` (``lost``), or the camera stops (``stopped``,
  ``close_all``). Open zone visits are closed at the last time the object was seen.

With ``snapshots`` (a camera's ``snapshot.enabled``), each improvement of a track's best keeps
that frame's crop, and its ``end`` brings the snapshot payload (``Observed.snapshots``); with
``snapshot.at`` including ``new``, its ``new`` event brings one of the confirming frame too.

``state()`` is what the outbox keeps with the events (the next track id and each open track as
of its last event), so a restarted agent can close them (``restart_ends``). The clock is the
results' capture time, so replays and tests are deterministic.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from edge_agent.config.tracking import TrackingSettings
from edge_agent.contract import events as wire
from edge_agent.tracking import scene as geo
from edge_agent.tracking import snapshots as shots
from edge_agent.tracking.tracker import ObjectTracker


@dataclass(slots=True)
class Track:
    """One confirmed track's summary (wire names where it goes on the wire)."""

    id: int
    label: str
    first_seen: float
    path: geo.Path
    last_seen: float = 0.0
    frames: int = 0
    score: float = 0.0
    box: list[float] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=dict)
    model: dict[str, str] | None = None
    #: Best score when the last event went out, and that event's time.
    reported_score: float = 0.0
    last_event: float = 0.0
    #: A change not reported yet (held back by ``min_update_s``).
    held: str | None = None

    def wire(self, ts: float) -> dict[str, Any]:
        """The track fields of an event at ``ts`` (``contract.events.track_fields``)."""
        out: dict[str, Any] = {
            "track": self.id, "label": self.label, "first_seen": self.first_seen,
            "last_seen": self.last_seen, "frames": self.frames, "score": self.score,
            "box": self.box, "best": self.best,
        }
        if self.model is not None:
            out["model"] = self.model
        out["in_zones"] = self.path.in_zones()
        out["zones"] = self.path.wire_visits(ts)
        out["crossings"] = self.path.wire_crossings()
        return out


@dataclass(slots=True)
class Observed:
    """What one result produced: events (payload dicts) and zones whose occupancy changed."""

    events: list[dict[str, Any]] = field(default_factory=list)
    zones: dict[str, dict[str, int]] = field(default_factory=dict)
    #: Snapshot payloads of tracks that ended (``snapshots``; cameras that take them).
    snapshots: list[dict[str, Any]] = field(default_factory=list)


class CameraTracks:
    """The tracks of one camera (see the module docstring); event loop thread only."""

    def __init__(self, node: str, camera: str, settings: TrackingSettings, scene: geo.Scene,
                 *, next_id: int, snapshots: shots.Snapshots | None = None) -> None:
        self.node = node
        self.camera = camera
        self.settings = settings
        self.scene = scene
        self.tracker = ObjectTracker(settings, next_id=next_id)
        self.tracks: dict[int, Track] = {}
        #: The best frame of each open track, for its snapshot (None: no snapshots).
        self.snapshots = snapshots
        self._occupancy: dict[str, dict[str, int]] = {z.name: {} for z in scene.zones}

    # ------------------------------------------------------------------ per result

    def observe(self, result: Mapping[str, Any], image: np.ndarray | None = None) -> Observed:
        """Track one result's detections; return the events and zone changes it caused.

        ``image``: the result's frame (cameras taking snapshots), to keep a track's best crop.
        """
        out = Observed()
        dets = result.get("detections")
        if dets is None:
            return out  # a classification result has no boxes to track
        ts = float(result["ts"])
        frame = result["frame"]
        w, h = float(frame["width"]), float(frame["height"])
        min_score = self.settings.min_score
        kept = [d for d in dets if d["score"] >= min_score]
        boxes = [(d["box"][0] * w, d["box"][1] * h, d["box"][2] * w, d["box"][3] * h)
                 for d in kept]
        step = self.tracker.step(ts, boxes, [d["score"] for d in kept],
                                 [d["label"] for d in kept])
        model = result.get("model")
        new = set(step.new)
        for tid, i in step.matched:
            d = kept[i]
            tr = self.tracks.get(tid)
            if tr is None:
                tr = self.tracks[tid] = Track(tid, d["label"], ts, geo.Path(d["label"]))
            self._seen(tr, d, ts, model)
            if image is not None and self.snapshots is not None and tr.best["ts"] == ts:
                self.snapshots.keep(tid, image, box=tr.box, ts=ts, score=tr.score,
                                    label=tr.label)
            moved = tr.path.move(self.scene, geo.anchor(tr.box), ts)
            if tid in new:
                self._emit(out, tr, "new", ts, None)
                if self.snapshots is not None:
                    shot = self.snapshots.first(tid, tr.path.zones_visited())
                    if shot is not None:
                        out.snapshots.append(shot)
            else:
                self._maybe_update(out, tr, ts, moved)
        for tid in step.ended:
            self._end(out, tid, ts, "lost")
        self._occupancy_changes(out, ts)
        return out

    @staticmethod
    def _seen(tr: Track, d: Mapping[str, Any], ts: float, model: Any) -> None:
        tr.last_seen = ts
        tr.frames += 1
        tr.score = round(float(d["score"]), 4)
        tr.box = [round(float(v), 5) for v in d["box"]]
        if not tr.best or tr.score > tr.best["score"]:
            tr.best = {"score": tr.score, "box": tr.box, "ts": ts}
        if isinstance(model, Mapping):
            tr.model = {"name": str(model.get("name")), "version": str(model.get("version"))}

    def _maybe_update(self, out: Observed, tr: Track, ts: float, moved: geo.Moved) -> None:
        s = self.settings
        reason = tr.held
        if moved.entered or moved.left:
            reason = "zone"
        elif moved.crossed and reason != "zone":
            reason = "line"
        elif reason is None and tr.best["score"] >= tr.reported_score + s.score_step:
            reason = "score"
        elif reason is None and ts - tr.last_event >= s.update_interval_s:
            reason = "interval"
        if reason is None:
            return
        if ts - tr.last_event < s.min_update_s:
            tr.held = reason
            return
        self._emit(out, tr, "update", ts, reason)

    def _emit(self, out: Observed, tr: Track, kind: str, ts: float, reason: str | None) -> None:
        out.events.append(wire.build_event(node=self.node, camera=self.camera, type=kind,
                                           ts=ts, track=tr.wire(ts), reason=reason))
        tr.last_event = ts
        tr.reported_score = tr.best.get("score", 0.0)
        tr.held = None

    def _end(self, out: Observed, tid: int, ts: float, reason: str) -> None:
        tr = self.tracks.pop(tid, None)
        if tr is None:
            return
        tr.path.close(tr.last_seen)
        out.events.append(wire.build_event(node=self.node, camera=self.camera, type="end",
                                           ts=ts, track=tr.wire(tr.last_seen), reason=reason))
        if self.snapshots is not None:
            shot = self.snapshots.take(tid, tr.path.zones_visited())
            if shot is not None:
                out.snapshots.append(shot)

    def _occupancy_changes(self, out: Observed, ts: float) -> None:
        if not self._occupancy:
            return
        now: dict[str, dict[str, int]] = {name: {} for name in self._occupancy}
        for tr in self.tracks.values():
            for name in tr.path.inside:
                labels = now[name]
                labels[tr.label] = labels.get(tr.label, 0) + 1
        for name, labels in now.items():
            if labels != self._occupancy[name]:
                self._occupancy[name] = labels
                out.zones[name] = labels

    # ------------------------------------------------------------------ lifecycle

    def close_all(self, reason: str = "stopped", ts: float | None = None) -> Observed:
        """End every open track (the camera or the agent stops) at ``ts`` (default: now)."""
        out = Observed()
        ts = time.time() if ts is None else ts
        self.tracker.close_all()
        for tid in list(self.tracks):
            self._end(out, tid, ts, reason)
        self._occupancy_changes(out, ts)
        return out

    def occupancy(self) -> dict[str, dict[str, int]]:
        """Each zone's count by label now (a copy)."""
        return {k: dict(v) for k, v in self._occupancy.items()}

    @property
    def active(self) -> int:
        """Confirmed tracks open now."""
        return len(self.tracks)

    def state(self) -> bytes:
        """What a restarted agent needs: the next id and each open track as of now."""
        return orjson.dumps({
            "next_id": self.tracker.next_id,
            "open": {str(tid): tr.wire(tr.last_seen) for tid, tr in self.tracks.items()},
        })


def load_state(blob: bytes | None) -> tuple[int | None, list[dict[str, Any]]]:
    """A stored ``state()``: (next track id or None, the open tracks' fields)."""
    if not blob:
        return None, []
    try:
        data = orjson.loads(blob)
        nxt = int(data["next_id"])
        tracks = [t for t in data.get("open", {}).values() if isinstance(t, dict)]
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None, []
    return nxt, tracks


def restart_ends(node: str, camera: str, tracks: Sequence[Mapping[str, Any]],
                 ts: float) -> list[dict[str, Any]]:
    """``end`` events (reason ``restart``) for tracks a previous process left open."""
    out = []
    for t in tracks:
        closed = dict(t)
        last = closed.get("last_seen", ts)
        closed["in_zones"] = []
        closed["zones"] = [v if v.get("left") is not None else
                           {**v, "left": last, "dwell_s": round(max(0.0, last - v["entered"]), 3)}
                           for v in closed.get("zones", []) if isinstance(v, dict)]
        out.append(wire.build_event(node=node, camera=camera, type="end", ts=ts, track=closed,
                                    reason="restart"))
    return out


def first_id_now() -> int:
    """The first track id of a camera with no stored counter: the wall clock in ms (above any
    id an earlier counter handed out while the clock is sane and under 1000 tracks/s)."""
    return time.time_ns() // 1_000_000
