"""The fleet and the rollouts on the hub's ``/metrics`` (Prometheus exposition).

A custom collector reads the live state at scrape time (no duplicated bookkeeping): per node
whether it is online and, per assigned model version, fps, error rate and latency p50/p95/p99
over the telemetry window; per active rollout its state and wave; and the hub's own counters
(telemetry messages, invalid payloads, desired messages sent, ingest lag p99).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from hub.rollouts.desired import assigned_models

if TYPE_CHECKING:
    from hub.server.control import ControlPlane


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
        for name, node in sorted(c.cluster.nodes().items()):
            online.add_metric([name], 1.0 if c.fleet.online(name) else 0.0)
            row = c.dispatcher.desired(name)
            gens.add_metric([name, "desired"], float(row.generation if row else 0))
            gens.add_metric([name, "applied"], float(c.fleet.generation(name)))
            for model, version in sorted(assigned_models(node.labels, prefix).items()):
                m = c.fleet.metrics(name, model, version)
                if not m.samples:
                    continue
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
        rollouts = GaugeMetricFamily("edge_hub_rollout_wave",
                                     "current wave of each active rollout (state as label)",
                                     labels=["rollout", "model", "version", "state"])
        for r in c.controller.active():
            rollouts.add_metric([str(r.id), r.spec.model, r.spec.version, r.state],
                                float(r.wave))
        yield rollouts
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
        lag = c.fleet.ingest_lag_p99()
        yield GaugeMetricFamily("edge_hub_ingest_lag_p99_seconds",
                                "p99 of receipt time minus the agent's timestamp",
                                value=lag if lag is not None else 0.0)
