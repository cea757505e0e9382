"""Where results meet tracking: a result sink that turns results into events and zone counts.

Why a sink: results reach the sink on the event loop, in order, per camera (the pipeline's
relay); wrapping the sink lets tracking see every result that is published without the
pipeline knowing about it, and decide per camera what goes on (``publish``: ``frames`` forwards
results only, ``events`` tracks only, ``both``). A model hot swap changes only the results'
``model``; the tracks live here, per camera, so their ids survive it.

Events go to the durable outbox (``EventOutbox.publish_to``) in their own seq series per camera
(``contract.events.events_stream``) with the camera's tracking state (next id, open tracks)
as the stream's state, committed with them. At start, ``TrackingSink`` reads what the previous
process left and sends ``end`` (reason ``restart``) for each track it had open, so no track
stays open forever in a subscriber's view; the id counter goes on where it stopped.

Zone occupancy goes to a ``zones_out.ZoneBoard`` (retained topics, latest wins).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import orjson
import structlog

from edge_agent.config import CameraSettings
from edge_agent.config.tracking import TrackingSettings
from edge_agent.contract import events as wire
from edge_agent.contract import snapshots as snap
from edge_agent.tracking import camera as cams
from edge_agent.tracking import scene as geo
from edge_agent.tracking import snapshots as shots
from edge_agent.tracking.zones_out import ZoneBoard

log = structlog.get_logger(__name__)


class ResultSinkLike(Protocol):
    """The sink results go on to (``streaming.sinks.ResultSink``)."""

    def publish(self, result: dict[str, Any]) -> int | None:
        """Queue a result."""
        ...

    async def aclose(self) -> None:
        """Flush and close."""
        ...


class EventOutbox(Protocol):
    """Where events go: the durable outbox (``outbox.facade.Outbox.publish_to``)."""

    def publish_to(self, stream: str, topic: str, message: dict[str, Any], *,
                   state: bytes | None = None) -> None:
        """Queue ``message`` in seq series ``stream`` with the stream's new ``state``."""
        ...


class TrackingSink:
    """A ``ResultSink`` that tracks objects per camera (see the module docstring)."""

    def __init__(
        self,
        inner: ResultSinkLike,
        outbox: EventOutbox,
        *,
        node: str,
        topic_prefix: str,
        settings: TrackingSettings,
        camera: Callable[[str], CameraSettings | None],
        states: Mapping[str, bytes] | None = None,
        board: ZoneBoard | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.inner = inner
        self.outbox = outbox
        self.node = node
        self.prefix = topic_prefix
        self.settings = settings
        self._camera = camera
        self.board = board
        self._clock = clock
        self._cams: dict[str, cams.CameraTracks | None] = {}
        self._next_ids: dict[str, int] = {}
        #: Events queued per camera since start (telemetry takes rates from it).
        self.events: dict[str, int] = {}
        #: Open tracks the previous process left, closed at start (``restart``).
        self.restart_closed = 0
        self._close_leftovers(states or {})

    # ------------------------------------------------------------------ start

    def _close_leftovers(self, states: Mapping[str, bytes]) -> None:
        now = self._clock()
        prefix = wire.events_stream("")
        for stream, blob in states.items():
            if not stream.startswith(prefix):
                continue
            cam = stream[len(prefix):]
            nxt, open_tracks = cams.load_state(blob)
            if nxt is not None:
                self._next_ids[cam] = nxt
            if not open_tracks:
                continue
            ends = cams.restart_ends(self.node, cam, open_tracks, now)
            self._send(cam, ends, self._empty_state(cam))
            self.restart_closed += len(ends)
            log.info("tracks_closed_after_restart", camera=cam, tracks=len(ends))

    def _empty_state(self, cam: str) -> bytes:
        nxt = self._next_ids.get(cam)
        return orjson.dumps({"next_id": nxt if nxt is not None else cams.first_id_now(),
                                  "open": {}})

    # ------------------------------------------------------------------ hot path

    def _tracks(self, cam: str) -> cams.CameraTracks | None:
        if cam in self._cams:
            return self._cams[cam]
        cs = self._camera(cam)
        if cs is None or cs.publish == "frames":
            self._cams[cam] = None
            return None
        nxt = self._next_ids.pop(cam, None)
        t = cams.CameraTracks(self.node, cam, self.settings,
                              geo.Scene.from_settings(cs.zones, cs.lines),
                              next_id=nxt if nxt is not None else cams.first_id_now(),
                              snapshots=(shots.Snapshots(self.node, cam, cs.snapshot)
                                         if cs.snapshot.enabled else None))
        self._cams[cam] = t
        if self.board is not None:
            for zone in cs.zones:
                self.board.set(cam, zone.name, self._zone_payload(cam, zone.name, {}))
        return t

    def publish(self, result: dict[str, Any]) -> int | None:
        """Track ``result`` (cameras publishing events) and pass it on (publishing frames)."""
        cam = result["camera"]
        # the frame rides along for snapshots only (``wants_image``); it is never serialized
        image = result.pop(snap.FRAME_KEY, None)
        tracks = self._tracks(cam)
        seq = None
        if tracks is None:
            return self.inner.publish(result)
        # tracking reads the result before the inner sink serializes it (no seq in it yet)
        seen = tracks.observe(result, image)
        cs = self._camera(cam)
        if cs is not None and cs.publish == "both":
            seq = self.inner.publish(result)
        self._deliver(cam, tracks, seen)
        return seq

    def _deliver(self, cam: str, tracks: cams.CameraTracks, seen: cams.Observed) -> None:
        if seen.events:
            self._send(cam, seen.events, tracks.state())
        for shot in seen.snapshots:
            self.outbox.publish_to(snap.snapshots_stream(cam),
                                   snap.snapshots_topic(self.prefix, self.node, cam), shot)
        if seen.zones and self.board is not None:
            for zone, labels in seen.zones.items():
                self.board.set(cam, zone, self._zone_payload(cam, zone, labels))

    def _zone_payload(self, cam: str, zone: str, labels: Mapping[str, int]) -> dict[str, Any]:
        return wire.build_zone(node=self.node, camera=cam, zone=zone, ts=self._clock(),
                               labels=labels)

    def _send(self, cam: str, events: list[dict[str, Any]], state: bytes) -> None:
        topic = wire.events_topic(self.prefix, self.node, cam)
        stream = wire.events_stream(cam)
        last = len(events) - 1
        for i, ev in enumerate(events):
            # the state rides on the last event of the step: committed with all of them
            self.outbox.publish_to(stream, topic, ev, state=state if i == last else None)
        self.events[cam] = self.events.get(cam, 0) + len(events)

    # ------------------------------------------------------------------ lifecycle

    def stop_camera(self, cam: str, reason: str = "stopped") -> None:
        """End a camera's open tracks (it was removed, or the agent stops)."""
        tracks = self._cams.pop(cam, None)
        if tracks is None:
            return
        self._deliver(cam, tracks, tracks.close_all(reason, self._clock()))
        self._next_ids[cam] = tracks.tracker.next_id

    def stop_all(self, reason: str = "stopped") -> None:
        """End every open track (a clean stop: the pipeline has stopped)."""
        for cam in list(self._cams):
            self.stop_camera(cam, reason)
        if self.board is not None:
            self.board.flush(final=True)

    async def aclose(self) -> None:
        """End the open tracks, then close the inner sink."""
        self.stop_all()
        await self.inner.aclose()

    def active(self) -> dict[str, int]:
        """Open tracks per camera now."""
        return {cam: t.active for cam, t in self._cams.items() if t is not None}

    def wants_image(self, cam: str) -> bool:
        """Whether results of ``cam`` should bring their frame (``contract.snapshots.FRAME_KEY``):
        it tracks and takes snapshots. Called by the pipeline's worker threads (reads only)."""
        cs = self._camera(cam)
        return cs is not None and cs.publish != "frames" and cs.snapshot.enabled

    def snapshot_counts(self) -> dict[str, shots.SnapshotCounts]:
        """Per camera taking snapshots: sent, their bytes and drops since start."""
        return {cam: t.snapshots.counts for cam, t in self._cams.items()
                if t is not None and t.snapshots is not None}
