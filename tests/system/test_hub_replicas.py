"""Three ``edge-hub serve`` replicas on one real PostgreSQL database, a real broker, the fake
Kubernetes API and simulated agents: the leader is ``kill -9``-ed or ``SIGSTOP``-ped in the
middle of a wave, another takes over, the rollout completes, and no node was sent anything
twice; commands and reads work through any replica."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hub.config import StorageSettings
from hub.registry.service import Registry
from tests.support.broker import Broker, free_port
from tests.support.fake_k8s import FakeKube
from tests.support.hub_client import client_ssl, write_secret
from tests.support.postgres import PostgresServer
from tests.support.rollout_env import (
    LABEL,
    MODEL,
    TOKEN,
    Fleet,
    HubProc,
    add_camera_nodes,
    hub_settings,
    push_version,
    write_hub_config,
)
from tests.support.sim_agents import Behaviour

pytestmark = [pytest.mark.slow, pytest.mark.fault]

LEASE_S = 2.0
TICK_S = 0.05  # write_hub_config's rollouts.tick_s


@dataclass
class Replicas:
    kube: FakeKube
    hubs: list[HubProc]
    fleet: Fleet

    def api(self, hub: HubProc, method: str, path: str, body: Any = None,
            timeout: float = 20) -> tuple[int, Any]:
        try:
            return hub.api(method, path, body, timeout)
        except OSError as exc:  # a stopped or killed replica
            return 0, str(exc)

    def metrics(self, hub: HubProc) -> str:
        req = urllib.request.Request(hub.url + "/metrics",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(req, timeout=10, context=client_ssl()) as resp:
            return resp.read().decode()  # type: ignore[no-any-return]

    def ready(self, hub: HubProc) -> dict[str, Any]:
        status, body = self.api(hub, "GET", "/readyz", timeout=0.5)
        return body if status in (200, 503) else {"leader": False, "status": "down"}

    def leaders(self, hubs: list[HubProc] | None = None) -> list[HubProc]:
        return [h for h in (hubs or self.hubs) if self.ready(h).get("leader")]

    def rollout(self, hub: HubProc, rid: int) -> dict[str, Any]:
        status, body = self.api(hub, "GET", f"/v1/rollouts/{rid}")
        assert status == 200, body
        return body["rollout"]  # type: ignore[no-any-return]

    def wait(self, cond: Any, timeout: float = 30, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                logs = "\n".join(h.log_text()[-1500:] for h in self.hubs)
                raise AssertionError(f"timed out: {what}\n{logs}")
            time.sleep(0.05)


def start_replicas(tmp: Path, broker: Broker, postgres: PostgresServer, models_dir: Path,
                   nodes: list[str], n: int = 3) -> Replicas:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    kube = FakeKube(hang_s=10).start()
    add_camera_nodes(kube, nodes, site="a")
    data_dir = tmp / "shared"  # the ReadWriteMany volume every replica mounts
    storage = {"data_dir": str(data_dir), "database_url": postgres.new_database(),
               "database_password_file": str(postgres.password_file(tmp)),
               "leader_lease_s": LEASE_S}

    async def prepare() -> None:
        settings = hub_settings(data_dir, broker=None, prefix="x", inventory=tmp)
        reg = Registry(settings.model_copy(update={"storage": StorageSettings(**storage)}))
        for v in ("1.0", "2.0"):
            await push_version(reg, models_dir, v)
        await reg.aclose()

    asyncio.run(prepare())
    token = write_secret(tmp / "token", TOKEN)
    kubeconfig = kube.write_kubeconfig(tmp / "kubeconfig")
    hubs = []
    for i in range(n):
        port = free_port()
        config = write_hub_config(tmp / f"hub{i}.yaml", data_dir=data_dir, port=port,
                                  token_file=token, broker=broker, prefix=prefix,
                                  kubeconfig=kubeconfig, storage=storage)
        hubs.append(HubProc(config, port, tmp / f"hub{i}.log").start())
    fleet = Fleet(broker, prefix)
    env = Replicas(kube, hubs, fleet)
    for name in nodes:
        fleet.add(name)
    env.wait(lambda: len(env.leaders()) == 1, 20, "one leader")
    for h in hubs:
        env.wait(lambda h=h: (b := env.api(h, "GET", "/v1/nodes")[1]) and
                 len(b["nodes"]) == len(nodes) and all(x["online"] for x in b["nodes"]),
                 30, "every replica sees the nodes online")
    return env


def close_replicas(env: Replicas) -> None:
    env.fleet.stop()
    for h in env.hubs:
        if h.proc is not None and h.proc.poll() is None:
            os.kill(h.proc.pid, signal.SIGCONT)
        h.stop()
    env.kube.stop()


@pytest.fixture
def nodes() -> list[str]:
    return [f"n-{i}" for i in range(6)]


@pytest.fixture
def replicas(tmp_path: Path, broker: Broker, postgres: PostgresServer, models_dir: Path,
             nodes: list[str]) -> Iterator[Replicas]:
    env = start_replicas(tmp_path, broker, postgres, models_dir, nodes)
    yield env
    close_replicas(env)


def start_rollout(env: Replicas, via: HubProc, bake: str) -> int:
    for a in env.fleet.agents.values():
        a.behaviour = Behaviour(load_s=0.2)
    status, body = env.api(via, "POST", "/v1/rollouts", {
        "model": MODEL, "version": "2.0", "selector": "site=a", "canary": 1,
        "waves": [50, 100], "bake_s": float(bake), "gates": ["p99_ms<=80"],
        "deadline_s": 60})
    assert status == 201, body
    return int(body["rollout"]["id"])


def assert_each_node_moved_once(env: Replicas, nodes: list[str]) -> None:
    assert all(env.kube.labels(n)[LABEL] == "2.0" for n in nodes)
    # one label change per node, and one desired generation carrying 2.0 (a re-send of the
    # same generation is allowed: it is the same message)
    assert env.kube.effective_patches == {n: 1 for n in nodes}
    for n, agent in env.fleet.agents.items():
        gens = {g for g, models in agent.desired_log if models.get(MODEL) == "2.0"}
        assert len(gens) == 1, (n, agent.desired_log)
        assert agent.versions_sent(MODEL)[-2:] == ["1.0", "2.0"], n


def test_kill9_of_the_leader_mid_wave(replicas: Replicas, nodes: list[str]) -> None:
    env = replicas
    leader = env.leaders()[0]
    follower = next(h for h in env.hubs if h is not leader)
    rid = start_rollout(env, follower, bake="1")  # a command through a follower
    env.wait(lambda: env.rollout(follower, rid)["wave"] == 1, 30, "wave 1")
    leader.kill9()
    killed_at = time.monotonic()
    rest = [h for h in env.hubs if h is not leader]
    env.wait(lambda: len(env.leaders(rest)) == 1, 10, "a new leader")
    takeover_s = time.monotonic() - killed_at
    print(f"kill -9: a new leader after {takeover_s:.2f} s (lease {LEASE_S} s)")
    # a killed leader's session closes with its socket: the lock is free at once, and a
    # follower tries every quarter lease
    assert takeover_s <= LEASE_S + TICK_S, takeover_s
    env.wait(lambda: env.rollout(rest[0], rid)["state"] == "succeeded", 60, "resumed to the end")
    assert_each_node_moved_once(env, nodes)
    # reads answer the same on every live replica
    views = [env.rollout(h, rid) for h in rest]
    assert all(v["state"] == "succeeded" and v["wave"] == views[0]["wave"] for v in views)
    new = env.leaders(rest)[0]
    assert "leadership_acquired" in new.log_text() and "rollout_resumed" in new.log_text()


def test_sigstop_of_the_leader_fences_it(replicas: Replicas, nodes: list[str]) -> None:
    env = replicas
    leader = env.leaders()[0]
    rid = start_rollout(env, leader, bake="1.5")
    env.wait(lambda: env.rollout(leader, rid)["state"] == "baking", 30, "canary baking")
    os.kill(leader.proc.pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    rest = [h for h in env.hubs if h is not leader]
    env.wait(lambda: len(env.leaders(rest)) == 1, 3 * LEASE_S + 5, "a new leader")
    # the paused leader's session ends after one lease of silence
    takeover_s = time.monotonic() - stopped_at
    print(f"SIGSTOP: a new leader after {takeover_s:.2f} s (lease {LEASE_S} s)")
    assert takeover_s <= LEASE_S + LEASE_S / 4 + 1.0, takeover_s
    env.wait(lambda: env.rollout(rest[0], rid)["state"] == "succeeded", 60, "completed")
    os.kill(leader.proc.pid, signal.SIGCONT)
    env.wait(lambda: env.ready(leader).get("leader") is False, 10, "the old leader steps down")
    assert "leadership_lost" in leader.log_text()
    assert len(env.leaders()) == 1
    # what it tried after waking reached no node: still one change per node
    time.sleep(0)  # nothing to wait for: the checks below are on what already happened
    assert_each_node_moved_once(env, nodes)


def test_commands_and_reads_through_any_replica(replicas: Replicas) -> None:
    env = replicas
    leader = env.leaders()[0]
    follower = next(h for h in env.hubs if h is not leader)
    assert "\nedge_hub_leader 1.0" in env.metrics(leader)
    assert "\nedge_hub_leader 0.0" in env.metrics(follower)
    rid = start_rollout(env, follower, bake="30")
    status, body = env.api(follower, "POST", f"/v1/rollouts/{rid}/pause", {})
    assert status == 200 and body["rollout"]["state"] == "paused", body
    # refused by the leader, answered by the follower as the leader answered
    status, body = env.api(follower, "POST", f"/v1/rollouts/{rid}/pause", {})
    assert status == 409 and body["error"]["code"] == "conflict", body
    status, body = env.api(follower, "POST", "/v1/rollouts/999/abort", {})
    assert status == 404, body
    for h in env.hubs:
        assert env.rollout(h, rid)["state"] == "paused"
    status, body = env.api(env.hubs[0], "POST", f"/v1/rollouts/{rid}/abort", {})
    assert status == 200, body
