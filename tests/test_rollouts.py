"""Rollouts end to end in one process: the real kubernetes client against the fake API server,
a real broker, a real registry, simulated agents that speak the wire contract."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from hub.control import ControlPlane
from hub.registry import Registry
from hub.rollout_model import RolloutSpec
from tests.broker import Broker
from tests.fake_k8s import FakeKube
from tests.rollout_env import (
    LABEL,
    MODEL,
    Fleet,
    ManualClock,
    add_camera_nodes,
    control_plane,
    hub_settings,
    push_version,
    until,
)
from tests.sim_agents import Behaviour

NODES = [f"cam-{i}" for i in range(6)]


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    k = FakeKube(hang_s=10).start()
    yield k
    k.stop()


@pytest.fixture
async def registry(tmp_path: Path, models_dir: Path) -> AsyncIterator[Registry]:
    settings = hub_settings(tmp_path / "data", mqtt_port=1, prefix="x", inventory=tmp_path)
    reg = Registry(settings)
    for v in ("1.0", "2.0"):
        await push_version(reg, models_dir, v)
    yield reg
    await reg.aclose()


@pytest.fixture
def fleet(broker: Broker, topic_prefix: str) -> Iterator[Fleet]:
    f = Fleet(broker.port, topic_prefix)
    yield f
    f.stop()


def settings_for(tmp_path: Path, broker: Broker, prefix: str, kube: FakeKube):  # type: ignore[no-untyped-def]
    return hub_settings(tmp_path / "data", mqtt_port=broker.port, prefix=prefix,
                        kubeconfig=kube.write_kubeconfig(tmp_path / "kubeconfig"))


def spec(**kw: object) -> RolloutSpec:
    base: dict[str, object] = {"model": MODEL, "version": "2.0", "selector": "site=a",
                               "canary": 1, "waves": [50, 100], "bake_s": 0.3,
                               "gates": ["p99_ms<=80", "error_rate<=0.01"], "deadline_s": 10,
                               "min_samples": 2}
    base.update(kw)
    return RolloutSpec.model_validate(base)


async def test_healthy_rollout_canary_waves_all(tmp_path: Path, broker: Broker, topic_prefix: str,
                                                kube: FakeKube, registry: Registry,
                                                fleet: Fleet) -> None:
    add_camera_nodes(kube, NODES, site="a")
    add_camera_nodes(kube, ["other-0"], site="b")
    for n in [*NODES, "other-0"]:
        fleet.add(n)
    cp = await control_plane(settings_for(tmp_path, broker, topic_prefix, kube), registry)
    try:
        await until(lambda: all(cp.fleet.online(n) for n in NODES))
        sent_before = {n: len(a.desired_log) for n, a in fleet.agents.items()}
        r = await cp.controller.create(spec())
        rid = r["id"]
        assert [len(w) for w in r["plan"]] == [1, 2, 3]
        await until(lambda: cp.controller.rollouts[rid].state == "succeeded", 30,
                    "rollout succeeded")
        ro = cp.controller.rollouts[rid]
        assert all(kube.labels(n)[LABEL] == "2.0" for n in NODES)
        assert kube.labels("other-0")[LABEL] == "1.0"
        assert all(fleet.agents[n].active_version(MODEL) == "2.0" for n in NODES)
        # the waves ran in order: each wave's nodes became active after the previous baked
        active_at = {e.node: e.active_at for e in ro.nodes.values()}
        waves = r["plan"]
        assert max(active_at[n] for n in waves[0]) <= min(active_at[n] for n in waves[1])
        assert max(active_at[n] for n in waves[1]) <= min(active_at[n] for n in waves[2])
        events = [e["kind"] for e in await cp.store.events(rid)]
        assert events.count("wave_passed") == 3 and events[-1] == "succeeded"
        # one version change per node, and nothing at all to the node outside the selector
        for n in NODES:
            assert fleet.agents[n].versions_sent(MODEL)[-2:] == ["1.0", "2.0"]
        assert len(fleet.agents["other-0"].desired_log) == sent_before["other-0"]
        assert sum(kube.effective_patches.values()) == len(NODES)
    finally:
        await cp.aclose()
