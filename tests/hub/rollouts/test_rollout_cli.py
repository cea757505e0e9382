"""``edge-hub rollout`` / ``edge-hub nodes`` against a real ``edge-hub serve`` child process (with
the fake Kubernetes API, a real broker and simulated agents), including a hub ``kill -9``."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hub.registry.service import Registry
from tests.support.broker import Broker, free_port
from tests.support.fake_k8s import FakeKube
from tests.support.hub_client import client_ssl, write_secret
from tests.support.rollout_env import (
    LABEL,
    MODEL,
    TOKEN,
    Fleet,
    HubProc,
    add_camera_nodes,
    cli,
    cli_inproc,
    hub_settings,
    push_version,
    write_hub_config,
)
from tests.support.sim_agents import Behaviour


@dataclass
class Env:
    kube: FakeKube
    hub: HubProc
    fleet: Fleet
    prefix: str

    def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return self.hub.api(method, path, body)

    def rollout(self, rid: int) -> dict[str, Any]:
        status, body = self.api("GET", f"/v1/rollouts/{rid}")
        assert status == 200, body
        return body["rollout"]  # type: ignore[no-any-return]

    def wait(self, cond: Any, timeout: float = 30, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out: {what}\n{self.hub.log_text()[-3000:]}")
            time.sleep(0.05)


def make_env(tmp: Path, broker: Broker, models_dir: Path, nodes: dict[str, str]) -> Env:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    kube = FakeKube(hang_s=10).start()
    for name, site in nodes.items():
        add_camera_nodes(kube, [name], site=site)
    data_dir = tmp / "data"

    async def prepare() -> None:
        reg = Registry(hub_settings(data_dir, broker=None, prefix="x", inventory=tmp))
        for v in ("1.0", "2.0"):
            await push_version(reg, models_dir, v)
        await reg.aclose()

    asyncio.run(prepare())
    token = write_secret(tmp / "token", TOKEN)
    port = free_port()
    config = write_hub_config(tmp / "hub.yaml", data_dir=data_dir, port=port, token_file=token,
                              broker=broker, prefix=prefix,
                              kubeconfig=kube.write_kubeconfig(tmp / "kubeconfig"))
    hub = HubProc(config, port, tmp / "hub.log").start()
    fleet = Fleet(broker, prefix)
    env = Env(kube, hub, fleet, prefix)
    for name in nodes:
        fleet.add(name)
    env.wait(lambda: all(n["online"] for n in env.api("GET", "/v1/nodes")[1]["nodes"])
             and len(env.api("GET", "/v1/nodes")[1]["nodes"]) == len(nodes), what="online")
    return env


def close_env(env: Env) -> None:
    env.fleet.stop()
    rc = env.hub.stop()
    env.kube.stop()
    assert rc == 0, env.hub.log_text()[-3000:]
    assert "Traceback" not in env.hub.log_text(), env.hub.log_text()[-3000:]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, broker: Broker,
        models_dir: Path) -> Iterator[Env]:
    e = make_env(tmp_path_factory.mktemp("cli"), broker, models_dir,
                 {"a-0": "a", "a-1": "a", "a-2": "a", "a-3": "a", "b-0": "b"})
    yield e
    close_env(e)


def test_bad_input_exits_2_and_changes_nothing(env: Env) -> None:
    cases = [
        (["--selector", "site in (a"], "selector"),
        (["--selector", "site=a", "--gate", "latency<=5"], "unknown gate metric"),
        (["--gate", "fps<=3"], "lower bound"),
        (["--gate", "p99_ms<=abc"], "cannot parse gate"),
        (["--waves", "50,25"], "increase"),
        (["--waves", "25,50"], "last wave must be 100"),
        (["--bake", "5 minutes"], "invalid duration"),
        (["--canary", "x"], "canary"),
        (["--selector", "site=nowhere"], "matches no camera nodes"),
    ]
    for extra, message in cases:
        res = cli_inproc(env.hub.url, "rollout", "start", MODEL, "2.0", *extra)
        assert res.returncode == 2, (extra, res.stdout, res.stderr)
        assert message in res.stderr, (extra, res.stderr)
    for model, version in (("det", "9.9"), ("nope", "1.0")):
        res = cli_inproc(env.hub.url, "rollout", "start", model, version)
        assert res.returncode == 2 and "not in the registry" in res.stderr, res.stderr
    # the API refuses the same on its own, with stable codes
    for body, code in (({"model": MODEL, "version": "2.0", "selector": "a in (x"},
                        "invalid_selector"),
                       ({"model": MODEL, "version": "2.0", "gates": ["p99<=1"]}, "invalid_gate"),
                       ({"model": MODEL, "version": "2.0", "bake_s": -1}, "invalid_request"),
                       ({"model": MODEL, "version": "2.0", "surprise": 1}, "invalid_request")):
        status, out = env.api("POST", "/v1/rollouts", body)
        assert status == 400 and out["error"]["code"] == code, out
    status, out = env.api("POST", "/v1/rollouts/1/explode")
    assert status == 404
    assert env.api("GET", "/v1/rollouts")[1] == {"rollouts": []}
    assert env.kube.effective_patches == {}
    assert all(env.kube.labels(n)[LABEL] == "1.0" for n in env.fleet.agents)


def test_dry_run_prints_the_plan(env: Env) -> None:
    res = cli_inproc(env.hub.url, "rollout", "start", MODEL, "2.0", "--selector", "site=a",
                     "--canary", "1", "--waves", "50,100", "--dry-run")
    assert res.returncode == 0, res.stderr
    lines = [ln.split() for ln in res.stdout.splitlines()]
    # one numbering everywhere: waves 1..N, wave 1 marked as the canary
    assert ["1", "(canary)", "a-0", "1.0", "yes"] in lines
    assert ["2", "a-1", "1.0", "yes"] in lines
    assert ["3", "a-3", "1.0", "yes"] in lines
    assert env.api("GET", "/v1/rollouts")[1] == {"rollouts": []}
    assert env.kube.effective_patches == {}


def test_commands_conflicts_and_views(env: Env) -> None:
    url = env.hub.url
    # the console script itself, once; the rest runs the same main() in this process
    res = cli(url, "rollout", "start", MODEL, "2.0", "--selector", "site=a", "--canary", "1",
              "--waves", "100", "--bake", "60s", "--gate", "p99_ms<=80")
    assert res.returncode == 0 and "rollout 1 started" in res.stdout, res.stderr
    env.wait(lambda: env.rollout(1)["state"] == "baking", what="canary baking")
    # an overlapping rollout of the same model is refused; a disjoint one is fine
    res = cli_inproc(url, "rollout", "start", MODEL, "2.0", "--selector", "site in (a,b)")
    assert res.returncode == 1 and "already covers nodes a-0" in res.stderr, res.stderr
    res = cli_inproc(url, "rollout", "start", MODEL, "2.0", "--selector", "site=b", "--bake", "60s")
    assert res.returncode == 0, res.stderr
    assert cli_inproc(url, "rollout", "abort", "2").returncode == 0
    assert env.rollout(2)["state"] == "aborted"
    assert cli_inproc(url, "rollout", "resume", "2").returncode == 1  # conflict
    # pause / resume / promote
    res = cli_inproc(url, "rollout", "pause", "1")
    assert res.returncode == 0 and "paused" in res.stdout
    assert cli_inproc(url, "rollout", "pause", "1").returncode == 1
    assert cli_inproc(url, "rollout", "resume", "1").returncode == 0
    assert env.rollout(1)["state"] == "baking"
    assert cli_inproc(url, "rollout", "promote", "1").returncode == 0
    env.wait(lambda: env.rollout(1)["state"] == "baking" and env.rollout(1)["wave"] == 1,
             what="wave 1 baking")
    assert all(env.kube.labels(f"a-{i}")[LABEL] == "2.0" for i in range(4))
    # views
    res = cli_inproc(url, "rollout", "status", "1")
    assert res.returncode == 0 and "baking" in res.stdout and "a-3" in res.stdout
    assert "2.0" in res.stdout
    res = cli_inproc(url, "rollout", "status")
    assert res.returncode == 0 and "aborted" in res.stdout
    res = cli_inproc(url, "nodes", "--selector", "site=a")
    assert res.returncode == 0, res.stderr
    rows = {ln.split()[0]: ln.split() for ln in res.stdout.splitlines()[1:]}
    assert set(rows) == {"a-0", "a-1", "a-2", "a-3"}
    assert rows["a-0"][1] == "yes" and rows["a-0"][2] == "det=2.0"
    assert rows["a-0"][-1] == "cam0"  # its camera, connected, not tracking
    nodes = json.loads(cli_inproc(url, "nodes", "--json").stdout)["nodes"]
    assert {n["name"] for n in nodes} == {"a-0", "a-1", "a-2", "a-3", "b-0"}
    scrape = urllib.request.Request(url + "/metrics",
                                    headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(scrape, timeout=10, context=client_ssl()) as resp:
        text = resp.read().decode()
    assert 'edge_hub_node_online{node="a-0"} 1.0' in text
    assert 'edge_hub_camera_connected{camera="cam0",node="a-0"} 1.0' in text
    assert 'edge_hub_camera_fps{camera="cam0",node="a-0"}' in text
    assert "edge_hub_camera_active_tracks{" not in text  # no simulated camera tracks
    assert 'edge_hub_model_latency_p99_ms{model="det",node="a-0",version="2.0"}' in text
    assert 'edge_hub_rollout_wave{model="det",rollout="1",state="baking",version="2.0"} 1.0' \
        in text
    # manual rollback: every touched node back to 1.0; watch ends at once with exit 1
    res = cli_inproc(url, "rollout", "rollback", "1")
    assert res.returncode == 0, res.stderr
    env.wait(lambda: env.rollout(1)["state"] == "rolled_back", what="rolled back")
    assert all(env.kube.labels(f"a-{i}")[LABEL] == "1.0" for i in range(4))
    res = cli_inproc(url, "rollout", "status", "1", "--watch", "--interval", "0.1")
    assert res.returncode == 1 and "rolled_back" in res.stdout
    assert env.rollout(1)["cause"] == {"reason": "manual", "by": "admin"}
    assert cli_inproc(url, "rollout", "rollback", "1").returncode == 1
    assert cli_inproc(url, "rollout", "pause", "99").returncode == 1  # not found
    # the registry asks the rollout side before deleting: 1.0 runs on the nodes
    status, out = env.api("DELETE", f"/v1/models/{MODEL}/versions/1.0")
    assert status == 409 and "a-0" in out["error"]["message"], out


@pytest.mark.slow
@pytest.mark.fault
def test_hub_kill9_mid_wave_resumes(tmp_path: Path, broker: Broker, models_dir: Path) -> None:
    nodes = {f"n-{i}": "a" for i in range(6)}
    env = make_env(tmp_path, broker, models_dir, nodes)
    try:
        for a in env.fleet.agents.values():
            a.behaviour = Behaviour(load_s=0.2)
        res = cli(env.hub.url, "rollout", "start", MODEL, "2.0", "--selector", "site=a",
                  "--canary", "1", "--waves", "50,100", "--bake", "1s", "--gate",
                  "p99_ms<=80", "--deadline", "30s")
        assert res.returncode == 0, res.stderr
        env.wait(lambda: env.rollout(1)["wave"] == 1, what="wave 1")
        env.hub.kill9()
        killed = {n: env.kube.labels(n)[LABEL] for n in nodes}
        assert "1.0" in killed.values() and "2.0" in killed.values()  # mid-rollout
        env.hub.start()
        env.wait(lambda: env.rollout(1)["state"] == "succeeded", 60, "resumed to the end")
        r = env.rollout(1)
        assert all(env.kube.labels(n)[LABEL] == "2.0" for n in nodes)
        # each node was patched once and sent exactly one version change, in generation order
        assert env.kube.effective_patches == {n: 1 for n in nodes}
        for n, agent in env.fleet.agents.items():
            assert agent.versions_sent(MODEL)[-2:] == ["1.0", "2.0"], n
            assert agent.versions_sent(MODEL).count("2.0") == 1, n
            gens = [g for g, _ in agent.desired_log]
            assert gens == sorted(gens), n
            by_gen: dict[int, dict[str, str]] = {}
            for g, models in agent.desired_log:
                assert by_gen.setdefault(g, models) == models, (n, g)
        assert {e["prev_version"] for e in r["nodes"]} == {"1.0"}
        assert "rollout_resumed" in env.hub.log_text()
    finally:
        close_env(env)
