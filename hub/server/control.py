"""The rollout side of the hub, assembled: cluster, MQTT, fleet, desired state, rollouts.

``ControlPlane`` owns the long-lived parts and starts them in dependency order (database, then
the node view, then MQTT so retained states flow in, then the dispatcher that catches up with the
labels, then the rollout controller after a grace period) and stops them in reverse. The HTTP
app (``hub/api/fleet.py``) and tests build one; ``is_assigned`` is what the registry asks before
deleting a version.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog

from hub.cluster.base import Cluster, StaticCluster
from hub.cluster.kubernetes import KubernetesCluster
from hub.config import ClusterSettings, HubSettings
from hub.fleet.view import Fleet
from hub.rollouts.controller import RolloutController
from hub.rollouts.desired import Catalog, Dispatcher
from hub.rollouts.store import RolloutStore
from hub.transport.mqtt import HubMqtt

log = structlog.get_logger(__name__)


def make_cluster(settings: ClusterSettings) -> Cluster:
    """The backend ``settings.backend`` names."""
    if settings.backend == "kubernetes":
        return KubernetesCluster(settings)
    return StaticCluster(settings)


class ControlPlane:
    """Everything the rollouts need, with one start and one stop."""

    def __init__(self, settings: HubSettings, catalog: Catalog, *,
                 clock: Callable[[], float] = time.time, cluster: Cluster | None = None,
                 mqtt_client_id: str | None = None) -> None:
        self.settings = settings
        self.catalog = catalog
        self.clock = clock
        self.fleet = Fleet(settings.telemetry, clock)
        self.cluster = cluster or make_cluster(settings.cluster)
        self.store = RolloutStore(settings.storage.data_dir)
        self.mqtt = HubMqtt(settings.mqtt, on_state=self.fleet.on_state,
                            on_telemetry=self.fleet.on_telemetry,
                            on_invalid=self.fleet.on_invalid, client_id=mqtt_client_id)
        self.dispatcher = Dispatcher(
            store=self.store, cluster=self.cluster, mqtt=self.mqtt, catalog=catalog,
            fleet=self.fleet, public_url=settings.public_url(),
            label_prefix=settings.cluster.label_prefix,
        )
        self.controller = RolloutController(
            settings=settings, store=self.store, cluster=self.cluster, fleet=self.fleet,
            dispatcher=self.dispatcher, catalog=catalog, clock=clock,
        )
        self._started: list[str] = []

    async def start(self, *, mqtt_wait_s: float = 0.0) -> None:
        """Start every part; on failure, stop what was started and re-raise."""
        try:
            await self.store.open()
            self._started.append("store")
            await self.cluster.start()
            self._started.append("cluster")
            await self.mqtt.start(wait_s=mqtt_wait_s)
            self._started.append("mqtt")
            await self.dispatcher.start()
            self._started.append("dispatcher")
            await self.controller.start(connected=self._connected)
            self._started.append("controller")
        except BaseException:
            await self.aclose()
            raise
        log.info("control_plane_started", nodes=len(self.cluster.nodes()),
                 active_rollouts=sum(r.active for r in self.controller.rollouts.values()))

    async def _connected(self) -> None:
        """Wait (as long as it takes, logging) for the broker connection."""
        while not await self.mqtt.wait_connected(10.0):
            log.warning("rollouts_waiting_for_mqtt", host=self.settings.mqtt.host,
                        port=self.settings.mqtt.port)

    async def aclose(self) -> None:
        """Stop in reverse order (idempotent)."""
        while self._started:
            part = self._started.pop()
            try:
                if part == "controller":
                    await self.controller.aclose()
                elif part == "dispatcher":
                    await self.dispatcher.aclose()
                elif part == "mqtt":
                    await self.mqtt.aclose()
                elif part == "cluster":
                    await self.cluster.aclose()
                elif part == "store":
                    await self.store.close()
            except Exception:
                log.exception("control_plane_stop_failed", part=part)

    async def __aenter__(self) -> ControlPlane:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def is_assigned(self, name: str, version: str) -> list[str]:
        """Nodes that run or are being moved to/from ``name`` ``version`` (registry deletes)."""
        return self.controller.assigned(name, version)
