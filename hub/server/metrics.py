"""The fleet and the rollouts on the hub's ``/metrics`` (Prometheus exposition).

A custom collector reads the live state at scrape time (no duplicated bookkeeping): per node
whether it is online and, per assigned model version, fps, error rate and latency p50/p95/p99
over the telemetry window; per active rollout its state and wave, per active or recently ended
rollout an info series and its start and end timestamps (Grafana annotations); and the hub's
own counters (telemetry messages, invalid payloads, desired messages sent, ingest lag p99).

Per model version (``edge_hub_version_*``) the same window merged over every node whose labels
assign that version: latency quantiles of all their frames (sketches merged, 1 % relative error;
``edge_hub_version_latency_exact`` is 0 while some of those nodes send no sketch and the figure
falls back to a mean of per-window percentiles), detections per frame and the median score.
Label cardinality stays bounded: only versions some node's labels assign are exported (the hub
sets those labels; a version string an agent makes up never becomes a label), at most
``MAX_VERSIONS`` per model, and class histograms stay in the API, never in labels.

Per camera of each online node (``edge_hub_camera_*``: connected, fps, drops, and for cameras
that track objects, active tracks and events per second): camera names come from the agent, so
only names valid in the contract are exported, at most ``MAX_CAMERAS_PER_NODE`` per node.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge_agent.contract import protocol
from hub.fleet import aggregate
from hub.rollouts.desired import assigned_models

#: Versions of one model exported per scrape (the most widely assigned first).
MAX_VERSIONS = 20
#: Cameras of one node exported per scrape (in the order its telemetry lists them).
MAX_CAMERAS_PER_NODE = 32

if TYPE_CHECKING:
    from edge_agent.contract.telemetry import CameraTelemetry
    from hub.rollouts.model import Rollout
    from hub.server.control import ControlPlane


class CameraFamilies:
    """``edge_hub_camera_*``, one series per (node, camera)."""

    def __init__(self) -> None:
        self.families = {
            name: GaugeMetricFamily(f"edge_hub_camera_{name}", help_, labels=["node", "camera"])
            for name, help_ in (
                ("connected", "1 while the camera delivers frames (online nodes only)"),
                ("fps", "frames per second over the node's telemetry window"),
                ("drops", "frames dropped in the node's telemetry window"),
                ("active_tracks", "confirmed object tracks open now (tracking cameras)"),
                ("events_per_second", "track events per second over the window (tracking "
                                      "cameras)"),
            )
        }

    def add(self, node: str, cameras: list[CameraTelemetry]) -> None:
        f = self.families
        for cam in exported_cameras(cameras):
            labels = [node, cam.camera]
            f["connected"].add_metric(labels, 1.0 if cam.connected else 0.0)
            f["fps"].add_metric(labels, cam.fps)
            f["drops"].add_metric(labels, float(cam.drops))
            if cam.active_tracks is not None:
                f["active_tracks"].add_metric(labels, float(cam.active_tracks))
            if cam.events_per_s is not None:
                f["events_per_second"].add_metric(labels, cam.events_per_s)


def exported_cameras(cameras: list[CameraTelemetry]) -> list[CameraTelemetry]:
    """The cameras that become label values: valid names, unique, at most the cap."""
    out: list[CameraTelemetry] = []
    seen: set[str] = set()
    for cam in cameras:
        if len(out) == MAX_CAMERAS_PER_NODE:
            break
        if protocol.is_valid_name(cam.camera) and cam.camera not in seen:
            seen.add(cam.camera)
            out.append(cam)
    return out


class FleetCollector(Collector):
    """Collects from a ``ControlPlane`` when scraped."""

    def __init__(self, control: ControlPlane) -> None:
        self.control = control

    def collect(self) -> Iterator[Metric]:
        c = self.control
        prefix = c.settings.cluster.label_prefix
        online = GaugeMetricFamily("edge_hub_node_online", "1 when the node is online",
                                   labels=["node"])
        gens = GaugeMetricFamily("edge_hub_node_generation",
                                 "desired generation sent vs applied by the agent",
                                 labels=["node", "kind"])
        figures = {
            name: GaugeMetricFamily(f"edge_hub_model_{name}", help_, labels=["node", "model",
                                                                            "version"])
            for name, help_ in (
                ("fps", "frames per second over the telemetry window"),
                ("error_rate", "errors per frame over the telemetry window"),
                ("latency_p50_ms", "p50 end-to-end latency over the window, ms"),
                ("latency_p95_ms", "p95 end-to-end latency over the window, ms"),
                ("latency_p99_ms", "p99 end-to-end latency over the window, ms"),
            )
        }
        cams = CameraFamilies()
        per_version: dict[tuple[str, str], list[aggregate.Metrics]] = {}
        for name, node in sorted(c.cluster.nodes().items()):
            is_online = c.fleet.online(name)
            online.add_metric([name], 1.0 if is_online else 0.0)
            # an offline node's cameras are unknown: no series rather than stale ones
            if is_online:
                cams.add(name, c.fleet.cameras(name))
            row = c.dispatcher.desired(name)
            gens.add_metric([name, "desired"], float(row.generation if row else 0))
            gens.add_metric([name, "applied"], float(c.fleet.generation(name)))
            for model, version in sorted(assigned_models(node.labels, prefix).items()):
                m = c.fleet.metrics(name, model, version)
                if not m.samples:
                    continue
                per_version.setdefault((model, version), []).append(m)
                labels = [name, model, version]
                figures["fps"].add_metric(labels, m.fps)
                for key, value in (("error_rate", m.error_rate), ("latency_p50_ms", m.p50_ms),
                                   ("latency_p95_ms", m.p95_ms),
                                   ("latency_p99_ms", m.p99_ms)):
                    if value is not None:
                        figures[key].add_metric(labels, value)
        yield online
        yield gens
        yield from figures.values()
        yield from cams.families.values()
        yield from version_families(per_version)
        rollouts = GaugeMetricFamily("edge_hub_rollout_wave",
                                     "current wave of each active rollout (state as label)",
                                     labels=["rollout", "model", "version", "state"])
        for r in c.controller.active():
            rollouts.add_metric([str(r.id), r.spec.model, r.spec.version, r.state],
                                float(r.wave))
        yield rollouts
        yield from rollout_families(c.controller.active(), c.controller.recently_ended())
        yield CounterMetricFamily("edge_hub_telemetry_messages", "state and telemetry received",
                                  value=c.fleet.messages)
        invalid = CounterMetricFamily(
            "edge_hub_invalid_payloads",
            "state and telemetry payloads dropped: malformed (broke the wire contract) or "
            "node_mismatch (payload node differs from its topic's)", labels=["reason"])
        for reason in ("malformed", "node_mismatch"):
            invalid.add_metric([reason], c.fleet.rejected[reason])
        yield invalid
        yield CounterMetricFamily("edge_hub_desired_messages", "desired messages published",
                                  value=c.dispatcher.sent)
        lead = c.leadership
        yield GaugeMetricFamily("edge_hub_leader", "1 on the replica that runs the rollouts and "
                                "desired-state dispatch (the only one with SQLite)",
                                value=1.0 if lead.leading else 0.0)
        yield _leadership_changes(lead.elected, lead.lost)
        lag = c.fleet.ingest_lag_p99()
        yield GaugeMetricFamily("edge_hub_ingest_lag_p99_seconds",
                                "p99 of receipt time minus the agent's timestamp",
                                value=lag if lag is not None else 0.0)


def _leadership_changes(elected: int, lost: int) -> Metric:
    fam = CounterMetricFamily("edge_hub_leadership_changes",
                              "times this replica became leader, and stepped down",
                              labels=["change"])
    fam.add_metric(["elected"], elected)
    fam.add_metric(["lost"], lost)
    return fam


def rollout_families(active: list[Rollout], ended: list[Rollout]) -> Iterator[Metric]:
    """Every active rollout and the recently ended ones (bounded by the controller): an info
    series with the state, and start and end timestamps for dashboard annotations."""
    labels = ["rollout", "model", "version"]
    info = GaugeMetricFamily("edge_hub_rollout_info",
                             "1 per active or recently ended rollout (state as label)",
                             labels=[*labels, "state"])
    started = GaugeMetricFamily("edge_hub_rollout_started_timestamp_seconds",
                                "when the rollout was created, Unix seconds", labels=labels)
    finished = GaugeMetricFamily("edge_hub_rollout_ended_timestamp_seconds",
                                 "when the rollout ended (succeeded, aborted, rolled_back), Unix "
                                 "seconds; cause: why it was rolled back or aborted",
                                 labels=[*labels, "state", "cause"])
    for r in [*active, *ended]:
        key = [str(r.id), r.spec.model, r.spec.version]
        info.add_metric([*key, r.state], 1.0)
        started.add_metric(key, r.created_at)
        if not r.active and r.finished_at is not None:
            cause = str((r.cause or {}).get("reason", ""))
            finished.add_metric([*key, r.state, cause], r.finished_at)
    yield from (info, started, finished)


def version_families(per_version: dict[tuple[str, str], list[aggregate.Metrics]]
                     ) -> Iterator[Metric]:
    """Per model version, every assigned node's window merged (see the module docstring)."""
    labels = ["model", "version"]
    nodes = GaugeMetricFamily("edge_hub_version_nodes",
                              "nodes whose labels assign the version and that sent telemetry",
                              labels=labels)
    latency = GaugeMetricFamily("edge_hub_version_latency_ms",
                                "end-to-end latency quantile of every frame of the version's "
                                "nodes over the window (merged sketches), ms",
                                labels=[*labels, "quantile"])
    exact = GaugeMetricFamily("edge_hub_version_latency_exact",
                              "1 when every frame came in a sketch (exact merge), 0 when some "
                              "nodes sent percentiles only", labels=labels)
    dpf = GaugeMetricFamily("edge_hub_version_detections_per_frame",
                            "boxes per frame over the window (0 for classification)",
                            labels=labels)
    score = GaugeMetricFamily("edge_hub_version_score_p50",
                              "median box (or top-1) score over the window", labels=labels)
    by_model: dict[str, list[tuple[str, list[aggregate.Metrics]]]] = {}
    for (model, version), ms in per_version.items():
        by_model.setdefault(model, []).append((version, ms))
    for model, versions in sorted(by_model.items()):
        versions.sort(key=lambda v: (-len(v[1]), v[0]))
        for version, ms in versions[:MAX_VERSIONS]:
            m = aggregate.combine(ms)
            key = [model, version]
            nodes.add_metric(key, float(len(ms)))
            exact.add_metric(key, 1.0 if m.exact else 0.0)
            for q, value in (("0.5", m.p50_ms), ("0.95", m.p95_ms), ("0.99", m.p99_ms)):
                if value is not None:
                    latency.add_metric([*key, q], value)
            if m.detections_per_frame is not None:
                dpf.add_metric(key, m.detections_per_frame)
            if m.score_p50 is not None:
                score.add_metric(key, m.score_p50)
    yield from (nodes, latency, exact, dpf, score)
