"""``edge-hub rollout start --shadow`` and ``rollout status`` with a shadow phase, against a real
``edge-hub serve`` child process (fake Kubernetes API, real broker, simulated agents)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hub.rollouts.test_rollout_cli import Env, close_env, make_env
from tests.support.broker import Broker
from tests.support.rollout_env import LABEL, MODEL, cli_inproc

SHADOW = f"edge.ai/shadow.{MODEL}"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, broker: Broker,
        models_dir: Path) -> Iterator[Env]:
    e = make_env(tmp_path_factory.mktemp("shadow-cli"), broker, models_dir,
                 {"s-0": "s", "s-1": "s", "s-2": "s"})
    yield e
    close_env(e)


def test_help_explains_the_shadow_options() -> None:
    res = cli_inproc("https://127.0.0.1:1", "rollout", "start", "--help")
    assert res.returncode == 0
    text = " ".join(res.stdout.split())
    assert "--shadow " in text and "never serving" in text
    assert "default 'agreement>=0.9'" in text and "default 200" in text
    assert "default 600s" in text


def test_bad_shadow_options_exit_2(env: Env) -> None:
    for args, message in [
        (["--shadow-gate", "p99_ms<=3"], "judges agreement"),
        (["--shadow-samples", "0"], "shadow.min_samples"),
        (["--shadow-timeout", "soon"], "invalid duration"),
    ]:
        res = cli_inproc(env.hub.url, "rollout", "start", MODEL, "2.0", "--selector", "site=s",
                         *args)
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert message in res.stderr, (args, res.stderr)
    assert all(SHADOW not in env.kube.labels(n) for n in ("s-0", "s-1", "s-2"))


def test_dry_run_shows_the_shadow_phase(env: Env) -> None:
    env.kube.label("s-2", LABEL, None)  # runs nothing: it has nothing to compare with
    env.wait(lambda: MODEL not in env.api("GET", "/v1/nodes/s-2")[1]["assigned"], what="label")
    try:
        res = cli_inproc(env.hub.url, "rollout", "start", MODEL, "2.0", "--selector", "site=s",
                         "--waves", "100", "--shadow-samples", "30", "--shadow-timeout", "2m",
                         "--dry-run")
    finally:
        env.kube.label("s-2", LABEL, "1.0")
        env.wait(lambda: env.api("GET", "/v1/nodes/s-2")[1]["assigned"].get(MODEL) == "1.0",
                 what="label back")
    assert res.returncode == 0, res.stderr
    text = " ".join(res.stdout.split())
    assert ("each wave starts with a shadow phase: agreement>=0.9 over at least 30 compared "
            "frames, within 120s") in text
    rows = {next(w for w in line.split() if w.startswith("s-")): line
            for line in res.stdout.splitlines() if " s-" in line}
    assert rows["s-0"].rstrip().endswith("compare")
    assert "nothing to compare with" in rows["s-2"]


def test_shadow_rollout_status_and_watch(env: Env) -> None:
    res = cli_inproc(env.hub.url, "rollout", "start", MODEL, "2.0", "--selector", "site=s",
                     "--waves", "100", "--bake", "0.2s", "--shadow", "--shadow-samples", "20",
                     "--shadow-timeout", "1m", "--json")
    assert res.returncode == 0, res.stderr
    rid = json.loads(res.stdout)["rollout"]["id"]
    watch = cli_inproc(env.hub.url, "rollout", "status", str(rid), "--watch",
                       "--interval", "0.05")
    assert watch.returncode == 0, watch.stderr
    assert " shadowing wave 1/2" in watch.stdout
    assert "shadow agreement=1.000 [" in watch.stdout and "compared=" in watch.stdout
    r = env.rollout(rid)
    assert r["state"] == "succeeded"
    assert r["shadow"]["state"] == "passed" and r["shadow"]["wave"] == 1
    assert r["shadow"]["samples"] >= 20 and r["shadow"]["agreement"] == 1.0
    assert set(r["shadow"]["nodes"]) == {"s-1", "s-2"}
    kinds = [e["kind"] for e in r["events"]]
    assert kinds.count("shadow_started") == 2 and kinds.count("shadow_passed") == 2
    status = cli_inproc(env.hub.url, "rollout", "status", str(rid))
    text = " ".join(status.stdout.split())
    assert "shadow (wave 2, passed): agreement>=0.9 agreement 1.000 [" in text
    assert "SHADOW NODE STATUS COMPARED AGREEMENT [95% CI]" in text
    assert all(SHADOW not in env.kube.labels(n) for n in ("s-0", "s-1", "s-2"))
    assert all(env.kube.labels(n)[LABEL] == "2.0" for n in ("s-0", "s-1", "s-2"))
