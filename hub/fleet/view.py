"""Telemetry in: what each node says about itself, kept per node and per model version.

The agents publish a retained ``state`` (online, applied generation, each model's version and
status; the last will says offline) and periodic ``telemetry`` (per model version frames,
errors and latency percentiles over the agent's interval). The hub keeps, per node:

* the latest state, and whether the node is online (its state says so and it was heard from
  within ``telemetry.offline_after_s``; silence makes it offline even without a last will);
* per (model, version) the telemetry samples of the last ``telemetry.window_s`` (a
  ``Series``), from which ``metrics()`` aggregates fps, error rate, latency p50/p95/p99 (merged
  sketches, ``hub/fleet/aggregate.py``) and output statistics for any sub-window.

Gates ask for every node's figures on every rollout tick, thousands of nodes each second, while
each node reports once per interval: a ``Series`` remembers what it merged for the last few
sub-windows it was asked for and only merges the samples that arrived since.

A node speaks only for itself: a message whose ``node`` differs from the node it arrived for
is dropped and counted (``rejected["node_mismatch"]``), here as in the MQTT link that checks it
first, so no code path can credit one node with another's state or telemetry.

Rollout gates read these aggregates; the API, the CLI and ``/metrics`` show them. Everything
here runs on the event loop (the MQTT thread hands decoded messages over in batches), so no
locks are needed; every timestamp is the hub's clock at receipt, so agents' clock skew does not
matter (the agent's own ``ts`` is only used to measure ingest lag).
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog

from edge_agent.contract.protocol import ModelState, StateMessage, TelemetryMessage
from edge_agent.contract.telemetry import CameraTelemetry
from hub.config import TelemetrySettings
from hub.fleet import aggregate as figures
from hub.fleet import series as windows
from hub.fleet import shadow as shadows

log = structlog.get_logger(__name__)

Clock = Callable[[], float]

#: Ingest lags kept for the p99 (the most recent ones).
_LAG_KEEP = 20_000


@dataclass
class NodeHealth:
    """Everything known about one node."""

    name: str
    state: StateMessage | None = None
    #: The last will (or a clean shutdown) said offline; cleared by the next online state.
    declared_offline: bool = False
    last_seen: float | None = None
    last_telemetry: float | None = None
    telemetry: TelemetryMessage | None = None
    samples: dict[tuple[str, str], windows.Series] = field(default_factory=dict)


class Fleet:
    """The hub's view of every node that ever spoke, fed by ``HubMqtt``."""

    def __init__(self, settings: TelemetrySettings, clock: Clock = time.time, *,
                 on_state_change: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self.clock = clock
        self.nodes: dict[str, NodeHealth] = {}
        #: Called with the node name when its state changes (the rollout controller wakes up).
        self._on_state_change = on_state_change
        self.messages = 0
        #: Payloads dropped, by reason (``malformed``, ``node_mismatch``).
        self.rejected: Counter[str] = Counter()
        self.lags: deque[float] = deque(maxlen=_LAG_KEEP)
        #: Shadow agreement windows per node, model and candidate (``hub/fleet/shadow.py``).
        self.shadows = shadows.ShadowLog()

    def _node(self, name: str) -> NodeHealth:
        h = self.nodes.get(name)
        if h is None:
            h = self.nodes[name] = NodeHealth(name)
        return h

    # -------------------------------------------------------------------------------- input
    @property
    def invalid(self) -> int:
        """Every payload dropped, whatever the reason."""
        return sum(self.rejected.values())

    def _foreign(self, node: str, msg: StateMessage | TelemetryMessage) -> bool:
        if msg.node == node:
            return False
        self.on_invalid("node_mismatch")
        log.warning("fleet_node_mismatch", node=node, payload_node=msg.node[:80],
                    total=self.rejected["node_mismatch"])
        return True

    def on_state(self, node: str, msg: StateMessage) -> None:
        """A state message (retained, or the last will) for ``node``."""
        if self._foreign(node, msg):
            return
        now = self.clock()
        self.messages += 1
        h = self._node(node)
        if msg.online:
            h.state = msg
            h.declared_offline = False
            h.last_seen = now
        else:
            # a last will carries no model list: keep what the node said before
            h.declared_offline = True
            if h.state is None or msg.models:
                h.state = msg
        if self._on_state_change is not None:
            self._on_state_change(node)

    def on_telemetry(self, node: str, msg: TelemetryMessage) -> None:
        """A telemetry message for ``node``: one sample per model version."""
        if self._foreign(node, msg):
            return
        now = self.clock()
        self.messages += 1
        if msg.ts > 0:
            self.lags.append(max(0.0, time.time() - msg.ts))
        h = self._node(node)
        h.last_seen = h.last_telemetry = now
        h.telemetry = msg
        horizon = now - self.settings.window_s
        for m in msg.models:
            series = h.samples.get((m.name, m.version))
            if series is None:
                series = h.samples[(m.name, m.version)] = windows.Series()
            sample, dropped = windows.sample_of(now, msg.interval_s, m)
            for reason in dropped:
                self.on_invalid(reason)
                log.warning("fleet_telemetry_part_dropped", node=node, model=m.name[:80],
                            reason=reason, total=self.rejected[reason])
            series.append(sample, horizon)
            if m.shadow is not None:
                self.shadows.add(node, m.name, m.shadow, now)

    def on_invalid(self, reason: str = "malformed") -> None:
        """A payload dropped for ``reason`` (counted; the MQTT layer logs it)."""
        self.rejected[reason] += 1

    # ------------------------------------------------------------------------------ queries
    def online(self, node: str) -> bool:
        """Heard from within ``offline_after_s`` and not declared offline by its last will."""
        h = self.nodes.get(node)
        if h is None or h.last_seen is None:
            return False
        if h.declared_offline:
            return False
        return self.clock() - h.last_seen <= self.settings.offline_after_s

    def model_state(self, node: str, model: str) -> ModelState | None:
        """What the node last said about ``model``."""
        h = self.nodes.get(node)
        if h is None or h.state is None:
            return None
        for m in h.state.models:
            if m.name == model:
                return m
        return None

    def generation(self, node: str) -> int:
        """The desired generation the node says it applied (0 when unknown)."""
        h = self.nodes.get(node)
        return h.state.generation if h is not None and h.state is not None else 0

    def metrics(self, node: str, model: str, version: str | None = None,
                since: float | None = None, exclude_version: str | None = None) -> figures.Metrics:
        """Aggregate of one node's samples for ``model`` (a version, or all but one)."""
        h = self.nodes.get(node)
        if h is None:
            return figures.aggregate(())
        horizon = self.clock() - self.settings.window_s
        start = max(horizon, since) if since is not None else horizon
        chosen: list[windows.Series] = []
        for (name, ver), series in h.samples.items():
            if name != model or (version is not None and ver != version):
                continue
            if exclude_version is not None and ver == exclude_version:
                continue
            series.evict(horizon)
            chosen.append(series)
        if len(chosen) == 1:
            return chosen[0].metrics(start)
        return figures.Metrics.from_parts(
            figures.merge_parts([s.parts(start) for s in chosen]) if chosen
            else figures.Parts())

    def shadow_figures(self, node: str, model: str, version: str,
                       since: float | None = None) -> shadows.ShadowFigures:
        """``node``'s shadow figures for candidate ``version`` of ``model`` since ``since``."""
        return self.shadows.figures(node, model, version, since)

    def versions(self, nodes: Iterable[str]) -> dict[tuple[str, str], tuple[int, figures.Metrics]]:
        """Per (model, version) over ``nodes``: how many report it, and their merged figures
        (latency sketches merged across nodes, so the p99 is the p99 of all their frames)."""
        per: dict[tuple[str, str], list[figures.Metrics]] = {}
        for node in nodes:
            h = self.nodes.get(node)
            if h is None:
                continue
            for name, ver in list(h.samples):
                m = self.metrics(node, name, ver)
                if m.samples:
                    per.setdefault((name, ver), []).append(m)
        return {k: (len(ms), figures.combine(ms)) for k, ms in sorted(per.items())}

    def ingest_lag_p99(self) -> float | None:
        """p99 of (receipt - agent timestamp) over recent telemetry, seconds."""
        if not self.lags:
            return None
        ordered = sorted(self.lags)
        return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]

    def cameras(self, node: str) -> list[CameraTelemetry]:
        """The node's cameras as of its last telemetry (empty before the first)."""
        h = self.nodes.get(node)
        return list(h.telemetry.cameras) if h is not None and h.telemetry is not None else []

    def describe(self, node: str) -> dict[str, Any]:
        """JSON view of a node for the API: online, state, per-version metrics."""
        h = self.nodes.get(node)
        out: dict[str, Any] = {"online": self.online(node), "last_seen": None,
                               "generation": 0, "agent_version": "", "providers": [],
                               "models": {}, "metrics": {}}
        if h is None:
            return out
        out["last_seen"] = h.last_seen
        if h.state is not None:
            out["generation"] = h.state.generation
            out["agent_version"] = h.state.agent_version
            out["providers"] = list(h.state.providers)
            out["models"] = {m.name: m.model_dump(exclude_none=True) for m in h.state.models}
        for name, ver in sorted(h.samples):
            m = self.metrics(node, name, ver)
            if m.samples:
                out["metrics"][f"{name}@{ver}"] = m.as_dict()
        if h.telemetry is not None:
            out["cameras"] = [c.model_dump() for c in h.telemetry.cameras]
            out["rss_bytes"] = h.telemetry.rss_bytes
        return out
