"""Rollouts end to end in one process: the real kubernetes client against the fake API server,
a real broker, a real registry, simulated agents that speak the wire contract."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from blockbuster import blockbuster_ctx

from hub.config import HubSettings
from hub.registry.service import Registry
from hub.rollouts.model import RolloutSpec
from hub.rollouts.store import RolloutStore
from tests.support.fake_k8s import FakeKube
from tests.support.rollout_env import (
    LABEL,
    MODEL,
    Fleet,
    ManualClock,
    add_camera_nodes,
    control_plane,
    hub_settings,
    push_version,
)
from tests.support.sim_agents import Behaviour, measure_latency_ms
from tests.support.waiting import until

NODES = [f"cam-{i}" for i in range(6)]


def spec(**kw: object) -> RolloutSpec:
    base: dict[str, object] = {"model": MODEL, "version": "2.0", "selector": "site=a",
                               "canary": 1, "waves": [50, 100], "bake_s": 0.3,
                               "gates": ["p99_ms<=80", "error_rate<=0.01"], "deadline_s": 10,
                               "min_samples": 2}
    base.update(kw)
    return RolloutSpec.model_validate(base)


async def test_healthy_rollout_canary_waves_all(
    settings: HubSettings, kube: FakeKube, registry: Registry, fleet: Fleet,
) -> None:
    add_camera_nodes(kube, NODES, site="a")
    add_camera_nodes(kube, ["other-0"], site="b")
    for n in [*NODES, "other-0"]:
        fleet.add(n)
    cp = await control_plane(settings, registry)
    try:
        await until(lambda: all(cp.fleet.online(n) for n in NODES))
        # the initial desired state (the labels at start-up) has reached everyone
        await until(lambda: all(a.desired_log for a in fleet.agents.values()))
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


async def test_slow_version_fails_gate_on_canary_and_rolls_back(
    settings: HubSettings, tmp_path: Path, kube: FakeKube, models_dir: Path, fleet: Fleet,
) -> None:
    # a generated model about 3x slower than the current one, timed for real on this machine
    fast, slow = measure_latency_ms(models_dir / "yolov8n-like" / "model.onnx",
                                    models_dir / "yolov8n-like-slow" / "model.onnx")
    assert slow / fast > 2.2, f"the slow model is not slow enough here ({fast=:.1f} {slow=:.1f})"
    reg = Registry(hub_settings(tmp_path / "data", broker=None, prefix="x", inventory=tmp_path))
    await push_version(reg, models_dir, "1.0", source="yolov8n-like")
    await push_version(reg, models_dir, "2.0", source="yolov8n-like-slow")
    add_camera_nodes(kube, NODES, site="a")
    timing = Behaviour(latency_ms={"1.0": fast, "2.0": slow})
    for n in NODES:
        fleet.add(n, behaviour=timing)
    cp = await control_plane(settings, reg)
    try:
        await until(lambda: all(cp.fleet.online(n) for n in NODES))
        # the initial desired state (the labels at start-up) has reached everyone
        await until(lambda: all(a.desired_log for a in fleet.agents.values()))
        sent_before = {n: len(a.desired_log) for n, a in fleet.agents.items()}
        r = await cp.controller.create(spec(gates=["p99_ms<=2x", "error_rate<=0.01"],
                                            bake_s=5))
        canary = r["plan"][0][0]
        await until(lambda: cp.controller.rollouts[r["id"]].state == "rolled_back", 30)
        ro = cp.controller.rollouts[r["id"]]
        assert ro.cause is not None
        assert ro.cause["reason"] == "gate" and ro.cause["metric"] == "p99_ms"
        assert ro.cause["value"] == pytest.approx(slow, rel=0.01)
        assert ro.cause["baseline"] == pytest.approx(fast, rel=0.01)
        assert ro.cause["limit"] == pytest.approx(2 * fast, rel=0.01)
        # the canary is back on 1.0; nobody else was touched or even sent a message
        assert kube.labels(canary)[LABEL] == "1.0"
        await until(lambda: fleet.agents[canary].active_version(MODEL) == "1.0")
        assert fleet.agents[canary].versions_sent(MODEL)[-3:] == ["1.0", "2.0", "1.0"]
        for n in NODES:
            if n != canary:
                assert len(fleet.agents[n].desired_log) == sent_before[n], n
                assert kube.labels(n)[LABEL] == "1.0"
        assert set(kube.effective_patches) == {canary}
        assert ro.nodes[canary].status == "rolled_back"
    finally:
        await cp.aclose()
        await reg.aclose()


async def test_node_reporting_failed_stops_the_wave(
    settings: HubSettings, kube: FakeKube, registry: Registry, fleet: Fleet,
) -> None:
    add_camera_nodes(kube, NODES, site="a")
    for n in NODES:
        # cam-1 is the second node of wave 1: the canary passes, then it fails
        fleet.add(n, behaviour=Behaviour(fail={"2.0"}) if n == "cam-1" else None)
    cp = await control_plane(settings, registry)
    try:
        await until(lambda: all(cp.fleet.online(n) for n in NODES))
        r = await cp.controller.create(spec(bake_s=0.2))
        assert r["plan"][0] == ["cam-0"] and "cam-1" in r["plan"][1]
        await until(lambda: cp.controller.rollouts[r["id"]].state == "rolled_back", 30)
        ro = cp.controller.rollouts[r["id"]]
        assert ro.cause == {"reason": "node_failed", "node": "cam-1",
                            "error": "session creation failed (simulated)"}
        assert ro.wave == 1
        assert all(kube.labels(n)[LABEL] == "1.0" for n in NODES)
        # the third wave was never touched
        assert not set(r["plan"][2]) & set(kube.effective_patches)
    finally:
        await cp.aclose()


async def test_node_never_active_by_the_deadline(
    settings: HubSettings, kube: FakeKube, registry: Registry, fleet: Fleet,
) -> None:
    clock = ManualClock()
    add_camera_nodes(kube, NODES[:3], site="a")
    for n in NODES[:3]:
        fleet.add(n, behaviour=Behaviour(stuck={"2.0"}))
        settings.telemetry.offline_after_s = 3600  # the jumps of the clock are not silence
    cp = await control_plane(settings, registry, clock=clock)
    try:
        await until(lambda: all(cp.fleet.online(n) for n in NODES[:3]))
        r = await cp.controller.create(spec(deadline_s=120))
        canary = r["plan"][0][0]
        ro = cp.controller.rollouts[r["id"]]
        await until(lambda: (m := cp.fleet.model_state(canary, MODEL)) is not None
                    and m.status == "loading" and m.target_version == "2.0")
        clock.advance(119)
        cp.controller.wake()
        await cp.controller.tick()
        assert ro.state == "applying"
        clock.advance(2)
        await until(lambda: ro.state == "rolled_back")
        assert ro.cause is not None and ro.cause["reason"] == "deadline"
        assert ro.cause["node"] == canary and ro.cause["limit"] == 120
        assert ro.cause["value"] == pytest.approx(121, abs=0.5)
        assert kube.labels(canary)[LABEL] == "1.0"
    finally:
        await cp.aclose()


async def test_offline_node_skipped_then_upgraded_and_judged(
    settings: HubSettings, kube: FakeKube, registry: Registry, fleet: Fleet,
) -> None:
    names = NODES[:4]
    add_camera_nodes(kube, names, site="a")
    for n in names:
        fleet.add(n)
    cp = await control_plane(settings, registry)
    try:
        await until(lambda: all(cp.fleet.online(n) for n in names))
        fleet.agents["cam-3"].kill()  # its last will says offline
        await until(lambda: not cp.fleet.online("cam-3"))
        r = await cp.controller.create(spec(waves=[100], gates=["p99_ms<=80"]))
        assert r["plan"] == [["cam-0"], ["cam-1", "cam-2", "cam-3"]]
        ro = cp.controller.rollouts[r["id"]]
        await until(lambda: ro.state == "waiting", 30)
        assert ro.nodes["cam-3"].status == "skipped"
        assert kube.labels("cam-3")[LABEL] == "1.0"
        # it comes back: upgraded, judged with the gates, and only then the rollout succeeds
        fleet.add("cam-3")
        await until(lambda: ro.state == "succeeded", 30)
        assert kube.labels("cam-3")[LABEL] == "2.0"
        assert ro.nodes["cam-3"].status == "active"
        events = await cp.store.events(r["id"])
        kinds = [e["kind"] for e in events]
        returned = kinds.index("node_returned")
        assert "wave_passed" in kinds[returned:]
        last_pass = [e for e in events[returned:] if e["kind"] == "wave_passed"][-1]
        assert last_pass["judged"] == 4
    finally:
        await cp.aclose()


@pytest.mark.slow
@pytest.mark.fault
async def test_k8s_faults_during_a_wave_are_retried_once(
    settings: HubSettings, kube: FakeKube, registry: Registry, fleet: Fleet,
) -> None:
    add_camera_nodes(kube, NODES, site="a")
    for n in NODES:
        fleet.add(n)
    kube.inject("PATCH", 409, node="cam-1")
    kube.inject("PATCH", 429, node="cam-2", times=2, retry_after=0.01)
    kube.inject("PATCH", 500, node="cam-3")
    kube.inject("PATCH", hang=True, node="cam-4")  # applied, then never answered
    kube.inject("GET", 503, node="cam-4")  # and the re-read after the timeout fails once too
    cp = await control_plane(settings, registry)
    try:
        await until(lambda: all(cp.fleet.online(n) for n in NODES))
        r = await cp.controller.create(spec(canary=0, waves=[100], bake_s=0.1))
        await until(lambda: cp.controller.rollouts[r["id"]].state == "succeeded", 30)
        assert all(kube.labels(n)[LABEL] == "2.0" for n in NODES)
        assert kube.effective_patches == {n: 1 for n in NODES}
        assert kube.count("PATCH", "cam-4") == 1  # the hung one landed; never sent again
        assert kube.count("PATCH", "cam-2") == 3
        for n in NODES:
            assert fleet.agents[n].versions_sent(MODEL)[-2:] == ["1.0", "2.0"]
    finally:
        await cp.aclose()


async def test_nothing_blocks_the_event_loop(
    settings: HubSettings, kube: FakeKube, registry: Registry, fleet: Fleet,
) -> None:
    """blockbuster raises in the loop thread on blocking socket, file and sleep calls: the
    whole control plane (start, a rollout with Kubernetes patches, SQLite, MQTT, a rollback,
    shutdown) must do its blocking work in threads."""
    add_camera_nodes(kube, NODES[:3], site="a")
    for n in NODES[:3]:
        fleet.add(n)
        await registry.get(MODEL, "1.0")  # the registry's own start-up is its business
    with blockbuster_ctx():
        cp = await control_plane(settings, registry)
        try:
            await until(lambda: all(cp.fleet.online(n) for n in NODES[:3]))
            r = await cp.controller.create(spec(canary=1, waves=[100], bake_s=0.1))
            await until(lambda: cp.controller.rollouts[r["id"]].state == "succeeded", 30)
            await cp.controller.command(r["id"], "rollback", actor="test")
            await until(lambda: cp.controller.rollouts[r["id"]].state == "rolled_back", 30)
        finally:
            await cp.aclose()
    assert all(kube.labels(n)[LABEL] == "1.0" for n in NODES[:3])


async def test_a_stop_lets_the_step_in_progress_write_what_it_decided(
    settings: HubSettings, kube: FakeKube, registry: Registry, fleet: Fleet,
) -> None:
    # the API shows a rollout "succeeded" the moment the step decides it; a shutdown right
    # then must not leave the database saying otherwise (a restart resumes from it)
    add_camera_nodes(kube, NODES[:2], site="a")
    for n in NODES[:2]:
        fleet.add(n)
    cp = await control_plane(settings, registry)
    entered, release = asyncio.Event(), asyncio.Event()
    save = cp.store.save

    async def held_save(r: Any, *args: Any, **kwargs: Any) -> None:
        if r.state == "succeeded":
            entered.set()
            await release.wait()  # the write is slow: the stop comes while it is pending
        await save(r, *args, **kwargs)

    cp.store.save = held_save  # type: ignore[method-assign]
    closing: asyncio.Task[None] | None = None
    try:
        await until(lambda: all(cp.fleet.online(n) for n in NODES[:2]))
        rid = (await cp.controller.create(spec(canary=1, waves=[100])))["id"]
        await until(entered.is_set, 30, "the step deciding success")
        assert cp.controller.rollouts[rid].state == "succeeded"
        closing = asyncio.create_task(cp.aclose())
        done, _ = await asyncio.wait({closing}, timeout=0.5)
        assert not done  # the stop waits for the step ...
        release.set()
        await closing  # ... which then writes it
    finally:
        release.set()
        if closing is None:
            await cp.aclose()
    store = RolloutStore.from_settings(settings.storage)
    await store.open()
    try:
        persisted = (await store.load(rid=rid))[0]
        assert persisted.state == "succeeded"
        assert [e["kind"] for e in await store.events(rid)][-1] == "succeeded"
    finally:
        await store.close()
