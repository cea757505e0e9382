"""The README's main-job command, end to end: ``bash scripts/demo.sh`` (docs/demo.md).

Everything is real: the setup script, mosquitto, ``edge-hub serve`` with a static inventory,
three ``edge-agent run`` processes decoding the sample video with efficientnet-lite0, the
``edge-hub`` client verbs, the rollout, and the results on MQTT. The first test runs the demo to
its summary (``--exit-after-summary --json``) and checks what it reports; the second interrupts
it mid-rollout the way Ctrl-C does. Both check that no process of the demo outlives it.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import queue
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
NODES = ["edge-1", "edge-2", "edge-3"]

#: What the demo may import from the project: the wire contract (its topics and the broker ACL)
#: and the consumer API. The rest it reaches only as a user does (command lines, HTTP, MQTT).
ALLOWED = {"edge_agent.contract.protocol", "edge_agent.contract.acl", "hub.client.results"}


def leftovers(workdir: Path) -> list[str]:
    """Processes whose command line names the demo's work dir (its children all do)."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if str(workdir) in cmd and p.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(f"{p.info['pid']}: {cmd}")
    return found


def kill_leftovers(workdir: Path) -> None:
    """Last resort after a failed test, so one failure does not leak into the next tests."""
    for p in psutil.process_iter(["cmdline"]):
        try:
            if str(workdir) in " ".join(p.info["cmdline"] or []):
                p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def test_demo_imports_only_public_surfaces() -> None:
    imported = set()
    for path in (ROOT / "demo").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # ``from package import module`` imports that module, not the package
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    imported.add(sub if _is_module(sub) else node.module)
    ours = {m for m in imported if m.split(".")[0] in ("edge_agent", "hub")}
    assert ours, "the demo uses hub.client.results for its subscriber"
    assert ours <= ALLOWED, ours - ALLOWED


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_demo_runs_to_its_summary(tmp_path: Path) -> None:
    wd = tmp_path / "demo"
    try:
        proc = subprocess.run(
            ["bash", "scripts/demo.sh", "--exit-after-summary", "--json", "--workdir", str(wd)],
            cwd=ROOT, capture_output=True, text=True, timeout=280, stdin=subprocess.DEVNULL,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        summary = json.loads(proc.stdout.strip().splitlines()[-1])

        rollout = summary["rollout"]
        assert summary["ok"] is True
        assert (rollout["model"], rollout["from_version"], rollout["version"]) == (
            "classifier", "1", "2")
        assert rollout["state"] == "succeeded", rollout
        assert rollout["waves"] == 2  # canary, then all
        assert rollout["cause"] is None

        assert [n["node"] for n in summary["nodes"]] == NODES
        for n in summary["nodes"]:
            assert n["online"] is True, n
            assert (n["version"], n["status"]) == ("2", "active"), n
            assert n["results_version"] == "2", n  # its latest result came from v2
            assert n["results"] > 0, n
            assert n["fps"] > 0, n
            assert n["p50_ms"] is not None and 0 < n["p50_ms"] <= n["p99_ms"], n
        res = summary["results"]
        assert res["delivered"] == sum(n["results"] for n in summary["nodes"]) > 0
        assert res["malformed"] == 0

        # progress went to stderr: the steps, the rollout's waves, the clean stop
        err = proc.stderr
        for text in ("$ edge-hub models push", "$ edge-hub rollout start classifier 2",
                     "(canary)", "rollout 1: succeeded"):
            assert text in err, text
        stopped = next(x for x in err.splitlines() if "stopped:" in x)
        for name in [*NODES, "hub", "broker"]:
            assert f"{name} exit 0" in stopped, stopped

        # nothing outlives the demo
        assert leftovers(wd) == []
        for name, pid in summary["pids"].items():
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == \
                psutil.STATUS_ZOMBIE, name
        # the named work dir is kept, with every child's log
        assert (wd / "hub" / "hub.log").is_file()
        assert all((wd / "agents" / n / "agent.log").is_file() for n in NODES)
    finally:
        kill_leftovers(wd)


def _reader(stream: subprocess.Popen[str], lines: queue.Queue[str]) -> None:
    assert stream.stdout is not None
    for line in stream.stdout:
        lines.put(line)


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_ctrl_c_mid_rollout_stops_everything(tmp_path: Path) -> None:
    wd = tmp_path / "demo"
    env = {**os.environ, "EDGE_DEMO_SKIP_SETUP": "1"}  # the first test ran the setup
    proc = subprocess.Popen(
        ["bash", "scripts/demo.sh", "--workdir", str(wd)], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL,
    )
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=_reader, args=(proc, lines), daemon=True)
    reader.start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 150
        while not any("rollout 1 started" in x for x in seen):
            assert proc.poll() is None, "".join(seen)
            assert time.monotonic() < deadline, "".join(seen)
            try:
                seen.append(lines.get(timeout=0.5))
            except queue.Empty:
                continue
        assert leftovers(wd), "the demo's children should be running now"
        proc.send_signal(signal.SIGINT)  # bash exec'd the demo: this is what Ctrl-C sends
        assert proc.wait(60) == 130, "".join(seen)
        while True:  # what the demo printed while stopping
            try:
                seen.append(lines.get(timeout=1.0))
            except queue.Empty:
                break
        out = "".join(seen)
        assert "summary" not in out
        stopped = next(x for x in out.splitlines() if "stopped:" in x)
        for name in [*NODES, "hub", "broker"]:
            assert f"{name} exit 0" in stopped, stopped
        assert leftovers(wd) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        kill_leftovers(wd)
        reader.join(10)  # EOF once the demo and its children closed the pipe
        if proc.stdout is not None:
            proc.stdout.close()
