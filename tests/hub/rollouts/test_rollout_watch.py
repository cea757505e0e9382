"""What the operator sees and the CLI's rough edges, against a real ``edge-hub serve`` child process
(fake Kubernetes API, real broker, simulated agents): ``rollout status --watch`` on a real pty
with gate values and the bake counting down, the gates in the API's rollout JSON, the dry-run
plan, one exit-code scheme, a start with no node online, a promote while a wave applies, ``GET``
on a command path, ``nodes --selector`` matching nothing."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.hub.rollouts.test_rollout_cli import Env, close_env, make_env
from tests.support.broker import Broker
from tests.support.hub_client import client_ssl, default_pki
from tests.support.rollout_env import (
    MODEL,
    ROOT,
    TOKEN,
    add_camera_nodes,
    cli_inproc,
)
from tests.support.sim_agents import Behaviour


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, broker: Broker,
        models_dir: Path) -> Iterator[Env]:
    e = make_env(tmp_path_factory.mktemp("watch"), broker, models_dir,
                 {"w-0": "w", "w-1": "w", "w-2": "w", "p-0": "p"})
    e.fleet.agents["p-0"].behaviour = Behaviour(stuck={"2.0"})  # never loads 2.0
    yield e
    close_env(e)


def _abort_all(env: Env) -> None:
    for r in env.api("GET", "/v1/rollouts")[1]["rollouts"]:
        if r["state"] not in ("succeeded", "aborted", "rolled_back"):
            env.api("POST", f"/v1/rollouts/{r['id']}/abort")


def test_help_shows_defaults_and_what_rolls_back() -> None:
    res = cli_inproc("https://127.0.0.1:1", "rollout", "start", "--help")
    assert res.returncode == 0
    text = " ".join(res.stdout.split())
    assert "(default 5m = 300s)" in text and "(default 10m = 600s)" in text
    assert "(default 1h = 3600s; 0: do not wait)" in text
    assert "Without any --gate only a node reporting the version failed, or not active by " \
           "--deadline, rolls back" in text
    assert "--allow-offline" in text
    res = cli_inproc("https://127.0.0.1:1", "rollout", "status", "--help")
    assert "seconds between refreshes (default 2)" in " ".join(res.stdout.split())


def test_exit_codes_are_one_scheme(env: Env) -> None:
    url = env.hub.url
    res = cli_inproc(url, "rollout", "status", "999")
    assert res.returncode == 1 and "rollout 999 not found" in res.stderr, res.stderr
    for verb in ("pause", "promote", "rollback"):
        res = cli_inproc(url, "rollout", verb, "999")
        assert res.returncode == 1 and "not found" in res.stderr, (verb, res.stderr)
    res = cli_inproc(url, "rollout", "start", MODEL, "2.0", "--waves", "50,25")  # usage
    assert res.returncode == 2 and "increase" in res.stderr
    assert cli_inproc(url, "nodes", "--selector", "site in (a").returncode == 2
    assert cli_inproc(url, "rollout", "status", "--watch", "--interval", "0").returncode == 2
    res = cli_inproc("https://127.0.0.1:1", "rollout", "status", "999")
    assert res.returncode == 3 and "cannot reach the hub" in res.stderr, res.stderr
    res = cli_inproc("https://127.0.0.1:1", "nodes")
    assert res.returncode == 3


def test_nodes_selector_matching_nothing_says_so(env: Env) -> None:
    res = cli_inproc(env.hub.url, "nodes", "--selector", "site=nowhere")
    assert res.returncode == 0, res.stderr
    assert "no nodes match selector 'site=nowhere'" in res.stderr
    assert "NODE" not in res.stdout  # no empty header
    res = cli_inproc(env.hub.url, "nodes", "--selector", "site=w")
    assert "w-0" in res.stdout and "no nodes match" not in res.stderr


def test_get_on_a_command_path_is_404_unless_the_rollout_exists(env: Env) -> None:
    status, body = env.api("GET", "/v1/rollouts/999/pause")
    assert status == 404 and body["error"]["code"] == "not_found", body
    assert "rollout 999 not found" in body["error"]["message"]
    status, body = env.api("GET", "/v1/rollouts/1/explode")
    assert status == 404 and "unknown rollout command" in body["error"]["message"]
    status, body = env.api("POST", "/v1/rollouts",
                           {"model": MODEL, "version": "2.0", "selector": "site=w",
                            "bake_s": 600})
    assert status == 201, body
    rid = body["rollout"]["id"]
    try:
        status, body = env.api("GET", f"/v1/rollouts/{rid}/pause")
        assert status == 405 and body["error"]["code"] == "method_not_allowed", body
        status, body = env.api("DELETE", f"/v1/rollouts/{rid}/pause")
        assert status == 405, body
        assert env.rollout(rid)["state"] != "paused"  # nothing happened
    finally:
        _abort_all(env)


def test_dry_run_shows_the_whole_spec_and_numbers_waves_without_a_canary(env: Env) -> None:
    res = cli_inproc(env.hub.url, "rollout", "start", MODEL, "2.0", "--selector", "site=w",
                     "--canary", "0", "--waves", "34,100", "--bake", "90s", "--deadline", "2m",
                     "--offline-wait", "0", "--dry-run")
    assert res.returncode == 0, res.stderr
    text = " ".join(res.stdout.split())
    assert "(canary)" not in text  # the first wave is not a canary here
    assert "waves: no canary, then 34%, 100% of the selected nodes" in text
    assert "bake 1m30s per wave" in text and "deadline 2m00s" in text
    assert "awaited 0s" in text
    assert "gates: none (only a node reporting failed or missing its deadline rolls back)" \
        in text
    rows = [ln.split()[:2] for ln in res.stdout.splitlines()]
    assert ["1", "w-0"] in rows and ["1", "w-1"] in rows and ["2", "w-2"] in rows
    res = cli_inproc(env.hub.url, "rollout", "start", MODEL, "2.0", "--selector", "site=w",
                     "--canary", "1", "--gate", "p99_ms<=80", "--gate", "fps>=0.9x",
                     "--dry-run")
    text = " ".join(res.stdout.split())
    assert "waves: canary 1 node, then 25%, 50%, 100%" in text
    assert "gates: p99_ms<=80, fps>=0.9x" in text
    assert ["1", "(canary)", "w-0"] in [ln.split()[:3] for ln in res.stdout.splitlines()]


def test_start_with_no_selected_node_online_is_refused(env: Env) -> None:
    add_camera_nodes(env.kube, ["c-0", "c-1"], site="c")  # no agent: never online
    env.wait(lambda: len(env.api("GET", "/v1/nodes?selector=site%3Dc")[1]["nodes"]) == 2,
             what="c nodes seen")
    before = env.api("GET", "/v1/rollouts")[1]["rollouts"]
    res = cli_inproc(env.hub.url, "rollout", "start", MODEL, "2.0", "--selector", "site=c")
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert "0 of 2 selected nodes are online" in res.stderr and "--allow-offline" in res.stderr
    assert env.api("GET", "/v1/rollouts")[1]["rollouts"] == before  # nothing started
    res = cli_inproc(env.hub.url, "rollout", "start", MODEL, "2.0", "--selector", "site=c",
                     "--allow-offline")
    try:
        assert res.returncode == 0, res.stderr
        assert "warning: 2 of 2 selected nodes are offline" in res.stderr
        assert "started" in res.stdout
    finally:
        _abort_all(env)


def test_promote_while_the_wave_applies_is_refused(env: Env) -> None:
    status, body = env.api("POST", "/v1/rollouts",
                           {"model": MODEL, "version": "2.0", "selector": "site=p",
                            "waves": [100], "bake_s": 1})
    assert status == 201, body
    rid = body["rollout"]["id"]
    try:
        env.wait(lambda: any(n["status"] == "applying" for n in env.rollout(rid)["nodes"]),
                 what="p-0 applying")
        res = cli_inproc(env.hub.url, "rollout", "promote", str(rid))
        assert res.returncode == 1, (res.stdout, res.stderr)
        assert "still applying wave 1/1 (1 nodes not active yet)" in res.stderr
        status, body = env.api("POST", f"/v1/rollouts/{rid}/promote")
        assert status == 409 and body["error"]["code"] == "conflict", body
        r = env.rollout(rid)
        assert r["state"] == "applying" and r["wave"] == 0
        assert "promoted" not in [e["kind"] for e in r["events"]]
        # paused while applying: still refused, and still paused
        assert cli_inproc(env.hub.url, "rollout", "pause", str(rid)).returncode == 0
        assert cli_inproc(env.hub.url, "rollout", "promote", str(rid)).returncode == 1
        assert env.rollout(rid)["state"] == "paused"
    finally:
        _abort_all(env)


def _gates_judged(env: Env, rid: int) -> bool:
    r = env.rollout(rid)
    gates = r["progress"]["gates"]
    return r["state"] == "baking" and bool(gates) and all(g["ok"] is True for g in gates)


def test_gate_values_in_the_api_and_on_a_terminal_watch(env: Env) -> None:
    status, body = env.api("POST", "/v1/rollouts",
                           {"model": MODEL, "version": "2.0", "selector": "site=w",
                            "waves": [100], "bake_s": 600,
                            "gates": ["p99_ms<=80", "p99_ms<=3x", "error_rate<=0.01"]})
    assert status == 201, body
    rid = body["rollout"]["id"]
    try:
        env.wait(lambda: _gates_judged(env, rid), what="gates judged")
        p = env.rollout(rid)["progress"]
        assert p["wave"] == {"number": 1, "of": 2, "canary": True}
        assert 0 < p["bake"]["remaining_s"] <= 600 and p["bake"]["bake_s"] == 600
        by_gate = {g["gate"]: g for g in p["gates"]}
        absolute, relative = by_gate["p99_ms<=80"], by_gate["p99_ms<=3x"]
        assert 10 < absolute["value"] < 80 and absolute["limit"] == 80
        assert absolute["node"] == "w-0"  # the canary, the worst (only) judged node
        assert relative["baseline"] is not None and 10 < relative["baseline"] < 80
        assert relative["limit"] == pytest.approx(3 * relative["baseline"])
        assert by_gate["error_rate<=0.01"]["value"] == 0.0
        assert p["judged"]["nodes"] == 1 and p["judged"]["ready"] == 1
        assert p["judged"]["samples"] >= 2 and p["judged"]["min_samples"] == 2
        assert p["canary"]["p99_ms"] == pytest.approx(absolute["value"])

        screen = _watch_on_a_pty(env, rid)
        assert f"rollout {rid}" in screen  # no ID: it followed the active rollout
        assert "wave 1/2 (canary)" in screen and "baking" in screen
        assert re.search(r"bake \d+s of 10m00s, 9m\d\ds left", screen), screen
        assert re.search(r"p99_ms<=80\s+\d+\.\d\d \(w-0\)\s+<= 80\.00\s+-\s+pass", screen), \
            screen
        assert re.search(r"p99_ms<=3x\s+\d+\.\d\d\s+<= \d+\.\d\d\s+\d+\.\d\d\s+pass", screen)
        assert "1/1 nodes" in screen and "PREVIOUS" in screen
        assert "wave 1 (canary) started" in screen and "wave 1 (canary) baking" in screen
        assert "aborted" in screen  # followed to the end
    finally:
        _abort_all(env)
    # a plain (non-terminal) watch prints the gates on its lines too
    res = cli_inproc(env.hub.url, "rollout", "status", str(rid), "--watch", "--interval", "0.1")
    assert res.returncode == 0 and f"rollout {rid} aborted wave 1/2 (canary)" in res.stdout


def _watch_on_a_pty(env: Env, rid: int) -> str:
    """``edge-hub rollout status --watch`` (no ID) on a real terminal: read until the gates
    and the bake show, abort the rollout, read until the watch ends."""
    cmd = [sys.executable, "-m", "hub", "rollout", "status", "--watch", "--interval", "0.3"]
    envv = {**os.environ, "PYTHONPATH": str(ROOT), "EDGE_HUB_URL": env.hub.url,
            "EDGE_HUB_TOKEN": TOKEN, "EDGE_HUB_CA_FILE": str(default_pki().ca_file),
            "COLUMNS": "200", "LINES": "60", "TERM": "xterm"}
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, stdout=slave, stderr=slave, env=envv, cwd=ROOT)
    os.close(slave)
    chunks: list[bytes] = []
    aborted = False
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            text = b"".join(chunks).decode(errors="replace")
            if not aborted and "left" in text and "pass" in text:
                env.api("POST", f"/v1/rollouts/{rid}/abort")
                aborted = True
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    assert aborted, b"".join(chunks).decode(errors="replace")[-3000:]
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode(errors="replace"))


def test_metrics_keep_ended_rollouts_for_dashboard_annotations(env: Env) -> None:
    status, body = env.api("POST", "/v1/rollouts",
                           {"model": MODEL, "version": "2.0", "selector": "site=w",
                            "bake_s": 600})
    assert status == 201, body
    rid = body["rollout"]["id"]
    env.wait(lambda: env.rollout(rid)["state"] == "baking", what="baking")
    mine = {"rollout": str(rid), "model": MODEL, "version": "2.0"}
    series = _scrape(env, mine)
    assert series["edge_hub_rollout_info"] == [({**mine, "state": "baking"}, 1.0)]
    assert series["edge_hub_rollout_started_timestamp_seconds"] == [
        (mine, pytest.approx(env.rollout(rid)["created_at"]))]
    assert "edge_hub_rollout_ended_timestamp_seconds" not in series
    assert cli_inproc(env.hub.url, "rollout", "rollback", str(rid)).returncode == 0
    env.wait(lambda: env.rollout(rid)["state"] == "rolled_back", what="rolled back")
    series = _scrape(env, mine)  # the series outlive the rollout: a dashboard marks its end
    assert series["edge_hub_rollout_info"] == [({**mine, "state": "rolled_back"}, 1.0)]
    assert series["edge_hub_rollout_ended_timestamp_seconds"] == [
        ({**mine, "state": "rolled_back", "cause": "manual"},
         pytest.approx(env.rollout(rid)["finished_at"]))]
    assert "edge_hub_rollout_started_timestamp_seconds" in series
    assert "edge_hub_rollout_wave" not in series  # only active rollouts have a wave


def _scrape(env: Env, match: dict[str, str]) -> dict[str, list[tuple[dict[str, str], Any]]]:
    """``/metrics``: the samples whose labels include ``match``, by metric name."""
    req = urllib.request.Request(env.hub.url + "/metrics",
                                 headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=10, context=client_ssl()) as resp:
        text = resp.read().decode()
    out: dict[str, list[tuple[dict[str, str], Any]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if match.items() <= sample.labels.items():
                out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out
