"""The shadow phase of a rollout end to end in one process: the real kubernetes client against the
fake API server, a real broker, a real registry, simulated agents that load a shadow candidate
when their desired state carries one and report the agreement a test chooses."""

from __future__ import annotations

from typing import Any

import pytest

from edge_agent.contract.protocol import ShadowTelemetry
from hub.config import HubSettings
from hub.errors import InvalidRequest
from hub.fleet import shadow as agreement
from hub.registry.service import Registry
from hub.rollouts.model import RolloutSpec, parse_spec
from tests.support.fake_k8s import FakeKube
from tests.support.rollout_env import (
    LABEL,
    MODEL,
    Fleet,
    add_camera_nodes,
    control_plane,
)
from tests.support.sim_agents import Behaviour
from tests.support.waiting import until

NODES = [f"cam-{i}" for i in range(4)]
SHADOW = f"edge.ai/shadow.{MODEL}"


def spec(**shadow: Any) -> RolloutSpec:
    return RolloutSpec.model_validate({
        "model": MODEL, "version": "2.0", "selector": "site=a", "canary": 1,
        "waves": [50, 100], "bake_s": 0.1, "gates": ["error_rate<=0.01"], "deadline_s": 10,
        "min_samples": 1,
        "shadow": {"gate": "agreement>=0.9", "min_samples": 40, "timeout_s": 20, **shadow}})


def start(kube: FakeKube, fleet: Fleet, behaviour: dict[str, Behaviour] | None = None) -> None:
    add_camera_nodes(kube, NODES, site="a")
    for n in NODES:
        # 5 frames per telemetry message, each compared
        fleet.add(n, behaviour=(behaviour or {}).get(n) or Behaviour(fps=100))


def no_shadow_labels(kube: FakeKube) -> bool:
    return all(SHADOW not in kube.labels(n) for n in NODES)


def never_served(fleet: Fleet, version: str = "2.0") -> bool:
    return all((MODEL, version) not in a.ever_active for a in fleet.agents.values())


# --------------------------------------------------------------------------------- pure parts
def test_wilson_interval_and_pooling() -> None:
    assert agreement.wilson(0, 0) is None
    low, high = agreement.wilson(90, 100) or (0, 0)
    assert low == pytest.approx(0.8256, abs=1e-3) and high == pytest.approx(0.9448, abs=1e-3)
    low, high = agreement.wilson(100, 100) or (0, 0)
    assert low == pytest.approx(0.963, abs=1e-3) and high == 1.0
    log = agreement.ShadowLog()
    log.add("a", MODEL, ShadowTelemetry(version="2.0", samples=30, agreement_sum=29.0), now=10)
    log.add("a", MODEL, ShadowTelemetry(version="2.0", samples=10, agreement_sum=1.0), now=20)
    log.add("b", MODEL, ShadowTelemetry(version="2.0", samples=60, agreement_sum=60.0), now=20)
    total = agreement.combine([log.figures("a", MODEL, "2.0"), log.figures("b", MODEL, "2.0")])
    assert (total.samples, total.agreement) == (100, 0.9)  # sums, not a mean of means
    assert log.figures("a", MODEL, "2.0", since=15).samples == 10
    assert log.figures("a", MODEL, "3.0").samples == 0
    for i in range(agreement.KEEP_VERSIONS + 3):  # a node cannot grow the log without bound
        log.add("a", MODEL, ShadowTelemetry(version=f"v{i}", samples=1), now=30 + i)
    assert len(log.windows[("a", MODEL)]) == agreement.KEEP_VERSIONS


@pytest.mark.parametrize(("body", "message"), [
    ({"shadow": {"gate": "p99_ms<=80"}}, "judges agreement"),
    ({"shadow": {"gate": "agreement<=0.9"}}, "lower bound"),
    ({"shadow": {"gate": "agreement>=1.5"}}, "fraction"),
    ({"shadow": {"min_samples": 0}}, "shadow.min_samples"),
    ({"shadow": {"timeout_s": 0}}, "shadow.timeout_s"),
    ({"shadow": {"samples": 10}}, "unknown field"),
    ({"gates": ["agreement>=0.9"]}, "shadow phase"),
])
def test_bad_shadow_specs_are_refused(body: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        parse_spec({"model": MODEL, "version": "2.0", **body})


def test_shadow_defaults() -> None:
    s = parse_spec({"model": MODEL, "version": "2.0", "shadow": {}}).shadow
    assert s is not None
    assert (s.gate, s.min_samples, s.timeout_s) == ("agreement>=0.9", 200, 600.0)
    assert parse_spec({"model": MODEL, "version": "2.0"}).shadow is None


# ---------------------------------------------------------------------------------- outcomes
async def test_passing_shadow_switches_wave_by_wave(
    settings: HubSettings, kube: FakeKube, registry: Registry, fleet: Fleet,
) -> None:
    start(kube, fleet, {n: Behaviour(fps=100, shadow_agreement={"2.0": 0.96}) for n in NODES})
    cp = await control_plane(settings, registry)
    try:
        await until(lambda: all(cp.fleet.online(n) for n in NODES))
        r = await cp.controller.create(spec())
        plan = r["plan"]
        assert [len(w) for w in plan] == [1, 1, 2]
        await until(lambda: cp.controller.rollouts[r["id"]].state == "succeeded", 30)
        ro = cp.controller.rollouts[r["id"]]
        assert all(kube.labels(n)[LABEL] == "2.0" for n in NODES)
        assert no_shadow_labels(kube)
        events = await cp.store.events(r["id"])
        kinds = [e["kind"] for e in events]
        assert kinds.count("shadow_started") == 3 and kinds.count("shadow_passed") == 3
        # each wave: shadow started, passed, then the switch was baked; in wave order
        for i in range(3):
            mine = [e["kind"] for e in events if e.get("wave_index") == i]
            assert mine.index("shadow_started") < mine.index("shadow_passed") \
                < mine.index("wave_baking") < mine.index("wave_passed"), mine
        passed = [e for e in events if e["kind"] == "shadow_passed"]
        for e in passed:
            assert e["samples"] >= 40 and e["agreement"] == pytest.approx(0.96, abs=1e-6)
            assert e["ci_low"] < 0.96 < e["ci_high"]
        # every node shadowed 2.0 beside 1.0 first, then was switched to 2.0 without a shadow
        for n in NODES:
            a = fleet.agents[n]
            assert a.versions_sent(MODEL)[-2:] == ["1.0", "2.0"]
            assert a.shadow_versions(MODEL)[-2:] == ["2.0", None]
        # wave 1's node got its shadow only after the canary's wave passed
        ts = {(e["kind"], e.get("wave_index")): e["ts"] for e in events}
        assert ts[("wave_passed", 0)] <= ts[("shadow_started", 1)]
        assert ro.shadow is not None and ro.shadow["state"] == "passed"
        assert ro.shadow["wave"] == 2
    finally:
        await cp.aclose()


async def test_low_agreement_stops_in_the_shadow_phase(
    settings: HubSettings, kube: FakeKube, registry: Registry, fleet: Fleet,
) -> None:
    start(kube, fleet, {n: Behaviour(fps=100, shadow_agreement={"2.0": 0.42}) for n in NODES})
    cp = await control_plane(settings, registry)
    try:
        await until(lambda: all(cp.fleet.online(n) for n in NODES))
        sent_before = {n: len(a.desired_log) for n, a in fleet.agents.items()}
        r = await cp.controller.create(spec())
        canary = r["plan"][0][0]
        await until(lambda: cp.controller.rollouts[r["id"]].state == "rolled_back", 30)
        ro = cp.controller.rollouts[r["id"]]
        cause = ro.cause
        assert cause is not None and cause["reason"] == "shadow_gate", cause
        assert cause["gate"] == "agreement>=0.9" and cause["min_samples"] == 40
        assert cause["samples"] >= 40 and cause["agreement"] == pytest.approx(0.42, abs=1e-6)
        assert cause["ci_low"] < 0.42 < cause["ci_high"] < 0.9
        assert cause["wave_index"] == 0 and cause["nodes"] == 1
        # never active anywhere, every model label as it was, the shadow label gone
        assert never_served(fleet)
        assert all(kube.labels(n)[LABEL] == "1.0" for n in NODES)
        await until(lambda: no_shadow_labels(kube))
        # the label's removal becomes a desired message without the candidate (written to the
        # database first, then published: it arrives a moment after the label is gone)
        await until(lambda: fleet.agents[canary].shadow_versions(MODEL)[-2:] == ["2.0", None])
        # the other nodes were not even sent a message
        for n in NODES:
            if n != canary:
                assert len(fleet.agents[n].desired_log) == sent_before[n], n
        assert ro.nodes[canary].status == "rolled_back"
        kinds = [e["kind"] for e in await cp.store.events(r["id"])]
        assert "shadow_failed" in kinds and "wave_baking" not in kinds
        assert kinds[-1] == "rolled_back"
    finally:
        await cp.aclose()


async def test_node_shadow_failure_ends_the_rollout(
    settings: HubSettings, kube: FakeKube, registry: Registry, fleet: Fleet,
) -> None:
    start(kube, fleet, {"cam-1": Behaviour(fps=100, shadow_fail={"2.0"})})
    cp = await control_plane(settings, registry)
    try:
        await until(lambda: all(cp.fleet.online(n) for n in NODES))
        r = await cp.controller.create(spec())
        assert r["plan"][1] == ["cam-1"]  # the canary passes, then wave 1's node fails
        await until(lambda: cp.controller.rollouts[r["id"]].state == "rolled_back", 30)
        ro = cp.controller.rollouts[r["id"]]
        assert ro.cause == {"reason": "shadow_failed", "node": "cam-1",
                            "error": "shadow session creation failed (simulated)",
                            "gate": "agreement>=0.9", "wave_index": 1}
        # the canary had been switched: it goes back; cam-1 never served 2.0
        assert all(kube.labels(n)[LABEL] == "1.0" for n in NODES)
        await until(lambda: no_shadow_labels(kube))
        assert (MODEL, "2.0") not in fleet.agents["cam-1"].ever_active
        assert ro.nodes["cam-1"].status == "rolled_back"
    finally:
        await cp.aclose()


async def test_timeout_and_abort_remove_the_shadow_labels(
    settings: HubSettings, kube: FakeKube, registry: Registry, fleet: Fleet,
) -> None:
    start(kube, fleet)
    cp = await control_plane(settings, registry)
    try:
        await until(lambda: all(cp.fleet.online(n) for n in NODES))
        r = await cp.controller.create(spec(min_samples=10_000_000, timeout_s=1.5))
        canary = r["plan"][0][0]
        await until(lambda: kube.labels(canary).get(SHADOW) == "2.0")
        await until(lambda: cp.controller.rollouts[r["id"]].state == "rolled_back", 30)
        cause = cp.controller.rollouts[r["id"]].cause
        assert cause is not None and cause["reason"] == "shadow_timeout"
        assert cause["limit"] == 1.5 and 0 < cause["samples"] < 10_000_000
        assert no_shadow_labels(kube) and never_served(fleet)

        # abort in the middle of a shadow phase: nodes keep their version, no shadow left
        r = await cp.controller.create(spec(min_samples=10_000_000, timeout_s=60))
        ro = cp.controller.rollouts[r["id"]]
        await until(lambda: (ro.shadow or {}).get("samples", 0) > 0)
        assert ro.state == "shadowing" and kube.labels(canary).get(SHADOW) == "2.0"
        after = await cp.controller.command(r["id"], "abort", actor="test")
        assert after["state"] == "aborted" and no_shadow_labels(kube)
        assert all(kube.labels(n)[LABEL] == "1.0" for n in NODES)
        await until(lambda: fleet.agents[canary].shadow_versions(MODEL)[-1] is None)
    finally:
        await cp.aclose()


async def test_hub_restart_mid_shadow_resumes(
    settings: HubSettings, kube: FakeKube, registry: Registry, fleet: Fleet,
) -> None:
    behaviour = {n: Behaviour(fps=100, shadow_samples=1) for n in NODES}
    start(kube, fleet, behaviour)
    cp = await control_plane(settings, registry)
    try:
        await until(lambda: all(cp.fleet.online(n) for n in NODES))
        r = await cp.controller.create(spec(min_samples=2000, timeout_s=120))
        rid, canary = r["id"], r["plan"][0][0]
        ro = cp.controller.rollouts[rid]
        await until(lambda: (ro.shadow or {}).get("samples", 0) > 0)
        started = ro.phase_started_at
    finally:
        await cp.aclose()
    assert kube.labels(canary).get(SHADOW) == "2.0"
    cp = await control_plane(settings, registry)
    try:
        ro = cp.controller.rollouts[rid]
        assert ro.state == "shadowing" and ro.phase_started_at == started
        assert ro.shadow is not None and ro.shadow["gate"] == "agreement>=0.9"
        for b in behaviour.values():
            b.shadow_samples = 200  # now enough frames to decide quickly
        await until(lambda: ro.state == "succeeded", 30)
        assert all(kube.labels(n)[LABEL] == "2.0" for n in NODES)
        assert no_shadow_labels(kube)
        kinds = [(e["kind"], e.get("wave_index")) for e in await cp.store.events(rid)]
        assert kinds.count(("shadow_started", 0)) == 1  # resumed, not started again
        assert ("shadow_passed", 0) in kinds
    finally:
        await cp.aclose()


async def test_shadow_label_reaches_the_agent_only_beside_a_model(
    settings: HubSettings, kube: FakeKube, registry: Registry, fleet: Fleet,
) -> None:
    """The dispatcher turns a shadow label into ``DesiredModel.shadow``; without a model label
    on the node (nothing to compare with) the shadow label is ignored and counted."""
    add_camera_nodes(kube, ["with"], site="a")
    add_camera_nodes(kube, ["without"], version=None, site="a")
    fleet.add("with", behaviour=Behaviour(fps=100))
    fleet.add("without", version=None)
    cp = await control_plane(settings, registry)
    try:
        await until(lambda: cp.fleet.online("with") and cp.fleet.online("without"))
        kube.label("with", SHADOW, "2.0")
        kube.label("without", SHADOW, "2.0")
        await until(lambda: fleet.agents["with"].shadow_versions(MODEL)[-1] == "2.0")
        row = cp.dispatcher.desired("with")
        assert row is not None
        shadow = row.models[MODEL]["shadow"]
        assert shadow["version"] == "2.0"
        assert shadow["sha256"] == (await registry.get(MODEL, "2.0")).sha256
        assert shadow["url"].endswith(f"/v1/models/{MODEL}/versions/2.0/artifact")
        await until(lambda: cp.dispatcher.shadows_ignored >= 1)
        assert cp.dispatcher.desired("without") is None
        # the agent loads it and reports agreement; the fleet view keeps it
        await until(lambda: cp.fleet.shadow_figures("with", MODEL, "2.0").samples > 0)
        assert cp.fleet.shadow_figures("with", MODEL, "2.0").agreement == 1.0
        assert (MODEL, "2.0") not in fleet.agents["with"].ever_active
    finally:
        await cp.aclose()
