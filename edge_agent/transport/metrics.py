"""Prometheus metrics of the outbox, the drain and the MQTT link, read at scrape time.

The outbox, the drain and the link already count everything in plain attributes (cheap on the
hot path: no metric lock per result). This collector turns those counts into metric families
when Prometheus scrapes, on the agent's own registry (``AgentMetrics.registry``; each agent has
its own, so tests can run several in one process).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge_agent.outbox.facade import Outbox
from edge_agent.transport.drain import Drain
from edge_agent.transport.link import MqttLink

#: Drop reasons always exported (at 0 until they happen), so alerts can be written up front.
DROP_REASONS = ("max_bytes", "max_rows", "max_age", "disk_full", "db_error", "backlog",
                "corrupt", "broker_rejected", "invalid")
#: Inbound message rejection reasons always exported.
REJECT_REASONS = ("oversize", "malformed", "callback_error")


class OutboxCollector(Collector):
    """Metric families for one outbox, and optionally its drain and MQTT link."""

    def __init__(self, outbox: Outbox, link: MqttLink | None = None,
                 drain: Drain | None = None) -> None:
        self.outbox = outbox
        self.link = link
        self.drain = drain

    def collect(self) -> Iterator[Metric]:
        """Yield the current values (called by the registry at scrape time)."""
        yield from self._outbox()
        if self.drain is not None:
            yield from self._drain(self.drain)
        if self.link is not None:
            yield from self._link(self.link)

    def _outbox(self) -> Iterator[Metric]:
        ob = self.outbox
        st = ob.stats
        yield GaugeMetricFamily("edge_agent_outbox_depth",
                                "Results accepted and not yet delivered or dropped",
                                value=ob.depth)
        yield GaugeMetricFamily("edge_agent_outbox_bytes",
                                "Bytes of queued results (what max_bytes bounds)",
                                value=ob.bytes_used())
        yield GaugeMetricFamily("edge_agent_outbox_disk_bytes",
                                "Bytes the outbox files take on disk (database + WAL)",
                                value=ob.disk_bytes())
        yield GaugeMetricFamily("edge_agent_outbox_oldest_age_seconds",
                                "Age of the oldest queued result", value=ob.oldest_age_s())
        yield CounterMetricFamily("edge_agent_outbox_appended",
                                  "Results committed to the outbox file", value=st.appended)
        yield CounterMetricFamily("edge_agent_outbox_delivered",
                                  "Results acknowledged by the broker (PUBACK)",
                                  value=st.delivered)
        dropped = CounterMetricFamily("edge_agent_outbox_dropped",
                                      "Results dropped, by reason", labels=["reason"])
        counts = ob.dropped()
        for reason in sorted(set(DROP_REASONS) | set(counts)):
            dropped.add_metric([reason], counts.get(reason, 0))
        yield dropped
        yield CounterMetricFamily("edge_agent_outbox_commits", "Commit transactions",
                                  value=st.commits)
        yield CounterMetricFamily("edge_agent_outbox_commit_seconds",
                                  "Seconds spent in commit transactions",
                                  value=st.commit_seconds)
        yield CounterMetricFamily("edge_agent_outbox_commit_errors",
                                  "Commit transactions that failed (disk full, I/O, corrupt)",
                                  value=st.commit_errors)
        yield CounterMetricFamily("edge_agent_outbox_corrupt_files",
                                  "Corrupt outbox files moved aside", value=st.corrupt_files)
        yield GaugeMetricFamily("edge_agent_outbox_disk_full",
                                "1 while the last write failed with a full disk",
                                value=1.0 if st.disk_full else 0.0)
        yield GaugeMetricFamily("edge_agent_outbox_open",
                                "1 while the outbox file is open", value=1.0 if st.db_open else 0.0)

    def _drain(self, drain: Drain) -> Iterator[Metric]:
        yield GaugeMetricFamily("edge_agent_outbox_inflight",
                                "Results sent and waiting for PUBACK", value=drain.inflight)
        yield GaugeMetricFamily("edge_agent_outbox_replay_rate",
                                "Results acknowledged per second (about 5 s average)",
                                value=drain.rate())

    def _link(self, link: MqttLink) -> Iterator[Metric]:
        s = link.stats
        yield GaugeMetricFamily("edge_agent_mqtt_connected", "1 while connected to the broker",
                                value=1.0 if link.connected else 0.0)
        yield CounterMetricFamily("edge_agent_mqtt_connects", "Successful connections",
                                  value=s.connects)
        yield CounterMetricFamily("edge_agent_mqtt_disconnects", "Connections lost or closed",
                                  value=s.disconnects)
        yield CounterMetricFamily("edge_agent_mqtt_connect_failures",
                                  "Connection attempts that failed or were refused",
                                  value=s.connect_failures)
        yield CounterMetricFamily("edge_agent_mqtt_received",
                                  "Messages received on subscribed topics", value=s.received)
        rej = CounterMetricFamily("edge_agent_mqtt_rejected",
                                  "Received messages dropped, by reason", labels=["reason"])
        for reason in sorted(set(REJECT_REASONS) | set(s.rejected)):
            rej.add_metric([reason], s.rejected.get(reason, 0))
        yield rej


def register(registry: CollectorRegistry, outbox: Outbox, link: MqttLink | None = None,
             drain: Drain | None = None) -> OutboxCollector:
    """Expose the outbox (and link, drain) on ``registry``; return the collector."""
    collector = OutboxCollector(outbox, link, drain)
    registry.register(collector)
    return collector
