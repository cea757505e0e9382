"""Wiring tracking into a running agent: the sink wrapper, the zone board, telemetry.

Called by the composition root (``edge_agent.app.compose``) with the outbox and the MQTT link
it built, so that module only names the steps. Tracking exists only with the durable outbox
(``pipeline.sink: mqtt``): events need its seqs and the open tracks its state.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from edge_agent.config import AgentSettings, CameraSettings
from edge_agent.contract.telemetry import CameraTelemetry
from edge_agent.tracking.sink import EventOutbox, ResultSinkLike, TrackingSink
from edge_agent.tracking.zones_out import RetainedLink, ZoneBoard


class StatefulOutbox(EventOutbox, ResultSinkLike, Protocol):
    """The outbox as tracking uses it: results, events, and the streams' stored state."""

    def stream_states(self) -> dict[str, bytes]:
        """Each stream's committed state."""
        ...


class LinkWithStats(RetainedLink, Protocol):
    """The MQTT link with its connection counters (``stats.connects``)."""

    @property
    def stats(self) -> Any:
        """Connection counters."""
        ...


async def wrap(outbox: StatefulOutbox, link: LinkWithStats, settings: AgentSettings,
               cameras: Callable[[], Sequence[CameraSettings]]) -> TrackingSink:
    """The sink the pipeline publishes to: tracking in front of the outbox.

    ``cameras`` returns the current camera settings (a config reload replaces them). Reads the
    previous process's open tracks (a thread: SQLite) and queues their ``restart`` ends.
    """
    states = await asyncio.to_thread(outbox.stream_states)
    board = ZoneBoard(link, prefix=settings.mqtt.topic_prefix, node=settings.node,
                      refresh_s=settings.tracking.zone_refresh_s,
                      min_interval_s=settings.tracking.zone_min_interval_s,
                      connects=lambda: int(link.stats.connects))

    def camera(name: str) -> CameraSettings | None:
        return next((c for c in cameras() if c.name == name), None)

    return TrackingSink(outbox, outbox, node=settings.node,
                        topic_prefix=settings.mqtt.topic_prefix, settings=settings.tracking,
                        camera=camera, states=states, board=board)


def camera_telemetry(base: Callable[[], list[CameraTelemetry]], sink: TrackingSink,
                     clock: Callable[[], float] = time.monotonic
                     ) -> Callable[[], list[CameraTelemetry]]:
    """``base`` (the pipeline's camera telemetry) with open tracks and events per second.

    One caller (the telemetry task): each call moves the event counts' baseline.
    """
    seen: dict[str, int] = {}
    shots_seen: dict[str, tuple[int, int]] = {}
    last = [clock()]

    def provide() -> list[CameraTelemetry]:
        out = base()
        now = clock()
        dt = max(1e-6, now - last[0])
        last[0] = now
        active = sink.active()
        shots = sink.snapshot_counts()
        for cam in out:
            if cam.camera not in active:
                continue
            n = sink.events.get(cam.camera, 0)
            cam.active_tracks = active[cam.camera]
            cam.events_per_s = round((n - seen.get(cam.camera, 0)) / dt, 3)
            seen[cam.camera] = n
            counts = shots.get(cam.camera)
            if counts is not None:
                now_counts = (counts.sent, sum(counts.dropped.values()))
                before = shots_seen.get(cam.camera, (0, 0))
                cam.snapshots = max(0, now_counts[0] - before[0])
                cam.snapshots_dropped = max(0, now_counts[1] - before[1])
                shots_seen[cam.camera] = now_counts
        return out

    return provide


__all__ = ["TrackingSink", "camera_telemetry", "wrap"]
