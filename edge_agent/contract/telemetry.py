"""Telemetry payloads: what each node reports about itself every interval.

Split from ``protocol`` (which re-exports every name here) because it is the part of the contract
that grows: per model version the frames, errors and latency (percentiles, and a mergeable
``contract.sketch`` since the sketch was added), the output statistics the drift gates judge,
and the agreement of a candidate running in shadow. Every field added after the first release
is optional, so agents that send the older form keep working during an upgrade.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from edge_agent.contract.sketch import SketchWire


class _Msg(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=False)


class LatencySummary(_Msg):
    """Latency percentiles over a telemetry window, milliseconds."""

    p50: float = 0.0
    p95: float = 0.0
    p99: float = 0.0


#: Most labels one ``OutputStats.classes`` holds; the rest are summed under ``OTHER_CLASS``.
MAX_CLASSES = 64
OTHER_CLASS = "_other"


class OutputStats(_Msg):
    """What one model version answered over the window (the drift gates compare it with the
    baseline nodes'). Detection and face tasks count boxes; classification its top-1 class."""

    #: Frames that produced an output (the denominator of ``detections``).
    frames: int = Field(0, ge=0)
    #: Boxes over those frames (detection and face tasks; 0 for classification).
    detections: int = Field(0, ge=0)
    #: Every box's score (detection, faces) or each frame's top-1 score (classification).
    scores: SketchWire | None = None
    #: Boxes per label (detection, faces) or frames per top-1 label (classification); at most
    #: ``MAX_CLASSES`` labels, the least frequent summed under ``OTHER_CLASS``.
    classes: dict[str, int] = Field(default_factory=dict, max_length=MAX_CLASSES + 1)


class ShadowTelemetry(_Msg):
    """A candidate version run in shadow beside the active one, over the window.

    Each compared frame scores an agreement in [0, 1] between the candidate's output and the
    active version's on the same frame: classification, 1 when the top-1 classes are equal;
    detection and faces, the F1 of the boxes matched one-to-one (same label, IoU >= 0.5),
    1 when both found nothing. The hub sums ``agreement_sum`` and ``samples`` over nodes and
    windows: agreement = sum / samples.
    """

    version: str
    samples: int = Field(0, ge=0)
    agreement_sum: float = Field(0.0, ge=0)
    #: Frames the candidate failed on (counted, never compared).
    errors: int = Field(0, ge=0)
    #: Frames not compared because the shadow's CPU budget was spent.
    skipped: int = Field(0, ge=0)
    #: Seconds the candidate spent inferring, and the active version over the same window.
    busy_s: float = Field(0.0, ge=0)
    active_busy_s: float = Field(0.0, ge=0)


class LayoutTelemetry(_Msg):
    """How this model is served now: the worker threads (shared by all models), its batch limit,
    and the measurement that chose them (docs/pipeline.md, re-evaluation). A state, repeated in
    every message, not a window."""

    workers: int = Field(1, ge=1)
    batch: int = Field(1, ge=1)
    #: Frames per second the layout delivered when it was chosen (all models together).
    fps_measured: float = Field(0.0, ge=0)
    #: ``startup``, ``stored``, ``recheck``, ``throughput_drop``, ``backlog_idle_cpu``,
    #: ``periodic``.
    reason: str = ""
    #: Unix time of the choice.
    at: float = 0.0
    #: The measurement's median fps per candidate (``w2b1``), at most 64.
    figures: dict[str, float] = Field(default_factory=dict, max_length=64)
    #: Live re-evaluations since the agent started, and how many changed the layout.
    evaluations: int = Field(0, ge=0)
    changes: int = Field(0, ge=0)


class ModelTelemetry(_Msg):
    """One model version's health over the telemetry window."""

    name: str
    version: str
    #: Counters since the previous telemetry message (a window, not totals).
    frames: int = 0
    errors: int = 0
    #: End-to-end inference latency over the window, milliseconds (percentiles: what agents
    #: before the sketch sent, and still send beside it).
    latency_ms: LatencySummary = Field(default_factory=LatencySummary)
    #: The same latencies as a mergeable sketch (``contract.sketch``), milliseconds.
    latency: SketchWire | None = None
    outputs: OutputStats | None = None
    #: The candidate running in shadow beside this (active) version, if any.
    shadow: ShadowTelemetry | None = None
    #: The serving layout (workers, batch) and how it was chosen; absent from older agents.
    layout: LayoutTelemetry | None = None


class CameraTelemetry(_Msg):
    """One camera's health over the telemetry window."""

    camera: str
    connected: bool
    fps: float = 0.0
    #: Frames dropped in the window (stale frames replaced, overload).
    drops: int = 0
    #: Frames motion gating kept from inference in the window (nothing moved, keep-alive not
    #: due; docs/pipeline.md). 0 without gating, and from agents older than gating.
    frames_still: int = Field(0, ge=0)
    #: Confirmed object tracks open now, and track events queued per second over the window
    #: (cameras publishing events; docs/events.md). Absent from cameras without tracking and
    #: from agents older than tracking.
    active_tracks: int | None = Field(None, ge=0)
    events_per_s: float | None = Field(None, ge=0)
    #: Track snapshots queued in the window, and dropped (none fitted ``max_bytes``, or no
    #: frame was kept). Absent from cameras without ``snapshot.enabled`` and older agents.
    snapshots: int | None = Field(None, ge=0)
    snapshots_dropped: int | None = Field(None, ge=0)


class OutboxTelemetry(_Msg):
    """The outbox now: queued results, their bytes and age, and drops by reason (totals)."""

    depth: int = 0
    bytes: int = 0
    oldest_age_s: float = 0.0
    dropped: dict[str, int] = Field(default_factory=dict)


class TelemetryMessage(_Msg):
    """Periodic node health, on ``telemetry_topic``."""

    v: Literal[1] = 1
    node: str
    ts: float
    interval_s: float
    agent_version: str = ""
    models: list[ModelTelemetry] = Field(default_factory=list)
    cameras: list[CameraTelemetry] = Field(default_factory=list)
    outbox: OutboxTelemetry = Field(default_factory=OutboxTelemetry)
    rss_bytes: int = 0
