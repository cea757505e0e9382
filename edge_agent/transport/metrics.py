"""Prometheus metrics of the outbox, the drain and the MQTT link, read at scrape time.

The outbox, the drain and the link already count everything in plain attributes (cheap on the
hot path: no metric lock per result). This collector turns those counts into metric families
when Prometheus scrapes, on the agent's own registry (``AgentMetrics.registry``; each agent has
its own, so tests can run several in one process).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

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
        yield from _families((
            (_GAUGE, "edge_agent_outbox_depth",
             "Results accepted and not yet delivered or dropped", ob.depth),
            (_GAUGE, "edge_agent_outbox_bytes",
             "Bytes of queued results (what max_bytes bounds)", ob.bytes_used()),
            (_GAUGE, "edge_agent_outbox_disk_bytes",
             "Bytes the outbox files take on disk (database + WAL)", ob.disk_bytes()),
            (_GAUGE, "edge_agent_outbox_oldest_age_seconds",
             "Age of the oldest queued result", ob.oldest_age_s()),
            (_COUNTER, "edge_agent_outbox_appended",
             "Results committed to the outbox file", st.appended),
            (_COUNTER, "edge_agent_outbox_delivered",
             "Results acknowledged by the broker (PUBACK)", st.delivered),
        ))
        yield _by_reason("edge_agent_outbox_dropped", "Results dropped, by reason",
                         DROP_REASONS, ob.dropped())
        yield from _families((
            (_COUNTER, "edge_agent_outbox_commits", "Commit transactions", st.commits),
            (_COUNTER, "edge_agent_outbox_commit_seconds",
             "Seconds spent in commit transactions", st.commit_seconds),
            (_COUNTER, "edge_agent_outbox_commit_errors",
             "Commit transactions that failed (disk full, I/O, corrupt)", st.commit_errors),
            (_COUNTER, "edge_agent_outbox_corrupt_files",
             "Corrupt outbox files moved aside", st.corrupt_files),
            (_GAUGE, "edge_agent_outbox_disk_full",
             "1 while the last write failed with a full disk", st.disk_full),
            (_GAUGE, "edge_agent_outbox_open", "1 while the outbox file is open", st.db_open),
        ))

    def _drain(self, drain: Drain) -> Iterator[Metric]:
        yield from _families((
            (_GAUGE, "edge_agent_outbox_inflight",
             "Results sent and waiting for PUBACK", drain.inflight),
            (_GAUGE, "edge_agent_outbox_replay_rate",
             "Results acknowledged per second (about 5 s average)", drain.rate()),
        ))

    def _link(self, link: MqttLink) -> Iterator[Metric]:
        s = link.stats
        yield from _families((
            (_GAUGE, "edge_agent_mqtt_connected",
             "1 while connected to the broker", link.connected),
            (_COUNTER, "edge_agent_mqtt_connects", "Successful connections", s.connects),
            (_COUNTER, "edge_agent_mqtt_disconnects", "Connections lost or closed", s.disconnects),
            (_COUNTER, "edge_agent_mqtt_connect_failures",
             "Connection attempts that failed or were refused", s.connect_failures),
            (_COUNTER, "edge_agent_mqtt_received",
             "Messages received on subscribed topics", s.received),
        ))
        yield _by_reason("edge_agent_mqtt_rejected", "Received messages dropped, by reason",
                         REJECT_REASONS, s.rejected)


_GAUGE, _COUNTER = GaugeMetricFamily, CounterMetricFamily
#: One unlabelled family: (kind, name, help, value; a flag counts as 1 or 0).
_Row = tuple[type[GaugeMetricFamily] | type[CounterMetricFamily], str, str, float]


def _families(rows: Iterable[_Row]) -> Iterator[Metric]:
    for kind, name, doc, value in rows:
        yield kind(name, doc, value=float(value))


def _by_reason(name: str, doc: str, always: Iterable[str], counts: dict[str, int]) -> Metric:
    """A counter family labelled by reason; the ``always`` reasons show (at 0) before they
    happen, so alerts can be written up front."""
    family = CounterMetricFamily(name, doc, labels=["reason"])
    for reason in sorted(set(always) | set(counts)):
        family.add_metric([reason], counts.get(reason, 0))
    return family


def register(registry: CollectorRegistry, outbox: Outbox, link: MqttLink | None = None,
             drain: Drain | None = None) -> OutboxCollector:
    """Expose the outbox (and link, drain) on ``registry``; return the collector."""
    collector = OutboxCollector(outbox, link, drain)
    registry.register(collector)
    return collector
