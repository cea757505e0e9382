"""Periodic node health on ``{prefix}/{node}/telemetry``: what the hub's rollout gates judge.

The publisher knows nothing about models, cameras or the outbox: it asks *providers*
(callables the composition root passes in) for their part of ``protocol.TelemetryMessage`` each
interval, adds the process RSS (psutil), and publishes at QoS 1. A provider that raises costs
only its own part of one message (logged, rate-limited). While the link is down a message is
skipped, not queued: telemetry describes now, and the hub judges windows, not backlogs.

One owner: everything here runs in the ``telemetry`` task on the event loop. It alone writes
``sent``/``skipped`` and alone calls the providers, which report what changed since their
previous call (``streaming.pipeline``), so no other caller can steal part of an interval.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field
from typing import TypeVar

import psutil
import structlog

from edge_agent.contract.protocol import (
    CameraTelemetry,
    ModelTelemetry,
    OutboxTelemetry,
    TelemetryMessage,
    encode,
    telemetry_topic,
)
from edge_agent.transport.link import MqttLink

log = structlog.get_logger(__name__)

ModelsProvider = Callable[[], list[ModelTelemetry]]
CamerasProvider = Callable[[], list[CameraTelemetry]]
OutboxProvider = Callable[[], OutboxTelemetry]
#: Seconds between log lines about a failing provider.
LOG_INTERVAL_S = 60.0

_T = TypeVar("_T")


@dataclass(eq=False)
class TelemetryPublisher:
    """Builds and publishes a ``TelemetryMessage`` every ``interval_s`` seconds.

    ``models``, ``cameras`` and ``outbox`` provide those parts of each message (None: empty).
    """

    link: MqttLink
    node: str
    interval_s: float
    _: KW_ONLY
    models: ModelsProvider | None = None
    cameras: CamerasProvider | None = None
    outbox: OutboxProvider | None = None
    agent_version: str = ""
    clock: Callable[[], float] = time.time
    #: Messages published / skipped because the link was down (the telemetry task's).
    sent: int = field(default=0, init=False)
    skipped: int = field(default=0, init=False)
    _proc: psutil.Process = field(default_factory=psutil.Process, init=False, repr=False)
    #: When each failing provider was last logged (``time.monotonic()``).
    _logged: dict[str, float] = field(default_factory=dict, init=False, repr=False)

    def _part(self, name: str, fn: Callable[[], _T] | None, default: _T) -> _T:
        if fn is None:
            return default
        try:
            return fn()
        except Exception as exc:
            now = time.monotonic()
            if now - self._logged.get(name, -1e9) >= LOG_INTERVAL_S:
                self._logged[name] = now
                log.error("telemetry_provider_failed", part=name, error=repr(exc)[:200])
            return default

    def build(self) -> TelemetryMessage:
        """One message from the providers' current answers."""
        try:
            rss = int(self._proc.memory_info().rss)
        except psutil.Error:
            rss = 0
        return TelemetryMessage(
            node=self.node,
            ts=self.clock(),
            interval_s=self.interval_s,
            agent_version=self.agent_version,
            models=self._part("models", self.models, list[ModelTelemetry]()),
            cameras=self._part("cameras", self.cameras, list[CameraTelemetry]()),
            outbox=self._part("outbox", self.outbox, OutboxTelemetry()),
            rss_bytes=rss,
        )

    def publish_once(self) -> bool:
        """Publish one message now; False (counted as skipped) while the link is down."""
        if not self.link.connected:
            self.skipped += 1
            return False
        topic = telemetry_topic(self.link.topic_prefix, self.node)
        if self.link.publish(topic, encode(self.build()), qos=1):
            self.sent += 1
            return True
        self.skipped += 1
        return False

    async def run(self) -> None:
        """Publish every ``interval_s`` until cancelled (the supervisor's ``telemetry`` task)."""
        while True:
            await asyncio.sleep(self.interval_s)
            self.publish_once()

