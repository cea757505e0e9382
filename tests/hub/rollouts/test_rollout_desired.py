"""Desired state out: labels (here from the static inventory, edited by hand) become retained
desired messages with every assigned model; generations only grow and survive restarts; a message
decided but never acknowledged is sent again on start, and nothing else is."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from paho.mqtt import client as mqtt

from edge_agent.common import mqtt as mqtt_base
from edge_agent.contract import protocol
from hub.cluster.base import load_inventory, write_inventory
from hub.registry.service import Registry
from hub.rollouts.store import DB_FILE
from tests.support.broker import Broker
from tests.support.mqtt_recorder import listen
from tests.support.postgres import hub_sql
from tests.support.rollout_env import CAM, LABEL, control_plane, hub_settings, push_version
from tests.support.waiting import until


class Recorder:
    """Every desired message on the broker: (node, generation, {model: version})."""

    def __init__(self, broker: Broker, prefix: str) -> None:
        self.got: list[tuple[str, int, dict[str, str]]] = []
        self.raw: list[protocol.DesiredMessage] = []
        self.lock = threading.Lock()
        self.c = listen(broker, f"{prefix}/+/desired", self._on, client_id=f"rec-{prefix}")

    def _on(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        d = protocol.decode_desired(msg.payload)
        with self.lock:
            self.raw.append(d)
            self.got.append((d.node, d.generation, {m: v.version for m, v in d.models.items()}))

    def for_node(self, node: str) -> list[tuple[int, dict[str, str]]]:
        with self.lock:
            return [(g, m) for n, g, m in self.got if n == node]

    def close(self) -> None:
        self.c.disconnect()
        mqtt_base.release(self.c)


@pytest.fixture
async def registry(tmp_path: Path, models_dir: Path) -> AsyncIterator[Registry]:
    reg = Registry(hub_settings(tmp_path / "data", broker=None, prefix="x", inventory=tmp_path))
    for v in ("1.0", "2.0"):
        await push_version(reg, models_dir, v)
    await push_version(reg, models_dir, "1.0", name="cls")
    yield reg
    await reg.aclose()


async def test_labels_become_desired_messages_and_generations_survive(
    tmp_path: Path, broker: Broker, topic_prefix: str, registry: Registry
) -> None:
    inv = tmp_path / "inventory.yaml"
    write_inventory(inv, {"n1": {CAM: "true", LABEL: "1.0"}, "n2": {CAM: "true"},
                          "gw": {LABEL: "1.0"}})  # gw is not a camera node: never addressed
    settings = hub_settings(tmp_path / "data", broker=broker, prefix=topic_prefix,
                            inventory=inv)
    rec = Recorder(broker, topic_prefix)
    cp = await control_plane(settings, registry)
    try:
        await until(lambda: rec.for_node("n1") == [(1, {"det": "1.0"})])
        d = rec.raw[0].models["det"]
        assert d.url == "http://hub.test:8081/v1/models/det/versions/1.0/artifact"
        assert d.manifest_url.endswith("/v1/models/det/versions/1.0/manifest")
        assert d.sha256 == (await registry.get("det", "1.0")).sha256
        await until(lambda: cp.dispatcher.all_published(["n1"]))
        # edits by hand: a new version, a second model, a typo'd version, an unassignment
        raw = load_inventory(inv)
        raw["n1"][LABEL] = "2.0"
        raw["n1"]["edge.ai/model.cls"] = "1.0"
        raw["n2"][LABEL] = "7.7"  # unknown: nothing to send
        write_inventory(inv, raw)
        await until(lambda: rec.for_node("n1")[-1] == (2, {"det": "2.0", "cls": "1.0"}))
        await until(lambda: cp.dispatcher.unknown_versions > 0)
        raw["n1"][LABEL] = "9.9"  # unknown: n1 keeps det 2.0, so nothing changes
        write_inventory(inv, raw)
        await until(lambda: cp.dispatcher.unknown_versions > 1)
        raw["n1"].pop("edge.ai/model.cls")
        write_inventory(inv, raw)
        await until(lambda: rec.for_node("n1")[-1] == (3, {"det": "2.0"}))
        assert rec.for_node("n2") == [] and rec.for_node("gw") == []
        await until(lambda: cp.dispatcher.all_published(["n1"]))
    finally:
        await cp.aclose()
    # restart: nothing changed, so nothing is sent
    seen = len(rec.got)
    cp = await control_plane(settings, registry)
    await cp.aclose()
    assert len(rec.got) == seen
    # a crash between deciding generation 4 and publishing it: on start it is sent again
    raw = load_inventory(inv)
    raw["n1"][LABEL] = "1.0"
    write_inventory(inv, raw)
    hub_sql(settings.storage, DB_FILE, "UPDATE node_desired SET generation=4, published=0, "
            "models=?, digest='x' WHERE node='n1'", ('{"det": {"version": "1.0"}}',))
    cp = await control_plane(settings, registry)
    try:
        # the row's digest does not match the labels' models: a fresh generation 5 goes out,
        # never a reused 4
        await until(lambda: rec.for_node("n1")[-1][0] == 5)
        assert rec.for_node("n1")[-1] == (5, {"det": "1.0"})
        await until(lambda: hub_sql(settings.storage, DB_FILE, "SELECT generation, published "
                                    "FROM node_desired WHERE node='n1'") == [(5, 1)])
        hub_sql(settings.storage, DB_FILE, "UPDATE node_desired SET published=0 WHERE node='n1'")
    finally:
        await cp.aclose()
    seen = len(rec.got)
    cp = await control_plane(settings, registry)
    try:
        await until(lambda: len(rec.got) == seen + 1)
        assert rec.got[-1] == ("n1", 5, {"det": "1.0"})  # unacknowledged: same generation
    finally:
        await cp.aclose()
        rec.close()
