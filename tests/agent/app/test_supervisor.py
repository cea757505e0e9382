"""The supervisor: named tasks, deaths, bounded shutdown; and a real ``edge-agent run`` process."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import orjson
import pytest
import structlog
import yaml

from edge_agent.app.supervisor import EXIT_TASK_DIED, LoopLagProbe, Supervisor
from tests.support.broker import free_port
from tests.support.waiting import until


async def _forever() -> None:
    await asyncio.Event().wait()


async def test_a_dead_root_task_stops_the_rest_and_exits_non_zero() -> None:
    sup = Supervisor(shutdown_timeout_s=2)
    cancelled = asyncio.Event()

    async def victim() -> None:
        try:
            await _forever()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def broken() -> None:
        await asyncio.sleep(0.01)
        raise RuntimeError("boom")

    steps: list[str] = []

    async def step() -> None:
        steps.append("sink")

    with structlog.testing.capture_logs() as logs:
        sup.spawn("capture[cam0]", victim())
        sup.spawn("outbox-drain", broken())
        sup.on_shutdown("sink", step)
        t0 = time.monotonic()
        code = await sup.run()
    assert code == EXIT_TASK_DIED
    assert time.monotonic() - t0 < 2
    assert cancelled.is_set() and steps == ["sink"]
    died = [e for e in logs if e["event"] == "task_died"]
    assert died and died[0]["task"] == "outbox-drain" and "boom" in died[0]["error"]


async def test_a_dead_non_root_task_is_logged_and_the_rest_keeps_running() -> None:
    sup = Supervisor(shutdown_timeout_s=2)

    async def broken() -> None:
        raise ValueError("side task")

    with structlog.testing.capture_logs() as logs:
        sup.spawn("main", _forever())
        sup.spawn("side", broken(), root=False)
        await asyncio.sleep(0.05)
        assert not sup.stopping and not sup.tasks["main"].done()
        sup.request_stop("test")
        code = await sup.run()
    assert code == 0
    assert any(e["event"] == "task_died" and e["task"] == "side" and e["root"] is False
               for e in logs)


async def test_shutdown_is_bounded_even_when_a_step_hangs() -> None:
    sup = Supervisor(shutdown_timeout_s=0.3)
    ran: list[str] = []

    async def hang() -> None:
        await _forever()

    async def later() -> None:
        ran.append("later")

    sup.spawn("main", _forever())
    sup.on_shutdown("stuck-step", hang)
    sup.on_shutdown("later", later)
    sup.request_stop("test")
    with structlog.testing.capture_logs() as logs:
        t0 = time.monotonic()
        assert await sup.run() == 0
        took = time.monotonic() - t0
    assert took < 1.0
    timed = [e for e in logs if e["event"] == "shutdown_timed_out"]
    assert timed and "stuck-step" in timed[0]["unfinished"] and "later" in timed[0]["unfinished"]


async def test_sigterm_only_sets_the_stop_event() -> None:
    sup = Supervisor(shutdown_timeout_s=1)
    sup.spawn("main", _forever())
    sup.install_signal_handlers()
    os.kill(os.getpid(), signal.SIGTERM)
    assert await asyncio.wait_for(sup.run(), 5) == 0


async def test_spawning_a_running_name_twice_is_refused() -> None:
    sup = Supervisor(shutdown_timeout_s=1)
    sup.spawn("main", _forever())
    with pytest.raises(ValueError, match="already running"):
        sup.spawn("main", _forever())
    sup.request_stop()
    await sup.run()


async def test_loop_lag_probe_sees_a_blocking_call() -> None:
    probe = LoopLagProbe(interval_s=0.01)
    seen: list[float] = []
    probe.observe(seen.append)
    task = asyncio.create_task(probe.run())
    await until(lambda: probe.samples >= 3, what="samples")
    assert probe.max_lag_s < 0.2
    time.sleep(0.3)  # noqa: ASYNC251 - blocking the loop on purpose
    n = probe.samples
    await until(lambda: probe.samples > n, what="a sample after the block")
    task.cancel()
    assert probe.max_lag_s >= 0.25 and max(seen) == probe.max_lag_s


# ---------------------------------------------------------------- the real process


def _config(tmp_path: Path, models_dir: Path, port: int, **extra: object) -> Path:
    cfg = {
        "node": "proc-node",
        "models": [{"name": "yolov8-head",
                    "manifest": str(models_dir / "yolov8-head" / "manifest.json")}],
        "cameras": [{"name": "cam-a", "url": "test://pattern?width=320&height=240&fps=30",
                     "model": "yolov8-head"}],
        "pipeline": {"sink": "jsonl", "jsonl_path": str(tmp_path / "results.jsonl"),
                     "workers": 2, "max_batch": 1},
        "http": {"host": "127.0.0.1", "port": port},
        "hub": {"cache_dir": str(tmp_path / "cache")},
        "log": {"json_lines": True},
        "shutdown_timeout_s": 5,
        **extra,
    }
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _agent_cmd() -> list[str]:
    return [sys.executable, "-m", "edge_agent", "run", "--config"]


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return int(r.status)
    except OSError:
        return 0


@pytest.mark.slow
def test_sigterm_to_a_real_agent_exits_0_within_the_bound(tmp_path: Path,
                                                         models_dir: Path) -> None:
    port = free_port()
    cfg = _config(tmp_path, models_dir, port)
    log_path = tmp_path / "agent.log"
    with log_path.open("wb") as log, subprocess.Popen(
        [*_agent_cmd(), str(cfg)], stdout=log, stderr=subprocess.STDOUT
    ) as proc:
        try:
            end = time.monotonic() + 60
            while _status(f"http://127.0.0.1:{port}/readyz") != 200:
                assert proc.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < end, "agent never became ready"
                time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            rc = proc.wait(timeout=15)
            took = time.monotonic() - t0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    out = log_path.read_text()
    assert rc == 0, out[-3000:]
    assert took < 5 + 2  # shutdown_timeout_s plus interpreter exit
    events = [orjson.loads(x)["event"] for x in out.splitlines() if x.startswith("{")]
    assert "shutdown_requested" in events and "shutdown_done" in events
    lines = (tmp_path / "results.jsonl").read_bytes().splitlines()
    assert lines and orjson.loads(lines[-1])["camera"] == "cam-a"  # flushed before exit


def test_bad_config_exits_2_with_the_field_path(tmp_path: Path, models_dir: Path) -> None:
    cfg = _config(tmp_path, models_dir, free_port(),
                  cameras=[{"name": "cam-a", "url": "ftp://nowhere/x", "model": "yolov8-head"},
                           {"name": "cam-b", "url": "test://pattern", "model": "missing"}])
    r = subprocess.run([*_agent_cmd(), str(cfg)], capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.returncode == 2
    assert "cameras.0.url: Value error, unsupported source scheme 'ftp'" in r.stderr
    assert "Traceback" not in r.stderr
    cfg.write_text(cfg.read_text().replace("ftp://nowhere/x", "test://pattern"))
    r = subprocess.run([*_agent_cmd(), str(cfg)], capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.returncode == 2
    assert "cameras.1.model: no model of that name in models (got 'missing')" in r.stderr


def test_a_model_that_cannot_load_exits_1_with_one_line(tmp_path: Path,
                                                       models_dir: Path) -> None:
    cfg = _config(tmp_path, models_dir, free_port(),
                  models=[{"name": "yolov8-head", "manifest": str(tmp_path / "nope.json")}])
    r = subprocess.run([*_agent_cmd(), str(cfg)], capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.returncode == 1
    assert "edge-agent: error:" in r.stderr and "Traceback" not in r.stderr


def test_a_port_in_use_exits_1_with_one_line_and_releases_what_started(
    tmp_path: Path, models_dir: Path
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = _config(tmp_path, models_dir, port)
        t0 = time.monotonic()
        r = subprocess.run([*_agent_cmd(), str(cfg)], capture_output=True, text=True,
                           timeout=60, check=False)
    assert r.returncode == 1, r.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr and "Traceback" not in r.stderr
    assert time.monotonic() - t0 < 30  # the cameras and workers it had started were stopped
    events = [orjson.loads(x)["event"] for x in r.stdout.splitlines() if x.startswith("{")]
    assert "pipeline_stopped" in events


def test_an_unwritable_results_file_exits_2_naming_the_field(tmp_path: Path,
                                                            models_dir: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where a folder should be")
    cfg = _config(tmp_path, models_dir, free_port())
    cfg.write_text(cfg.read_text().replace(str(tmp_path / "results.jsonl"),
                                           str(blocker / "results.jsonl")))
    r = subprocess.run([*_agent_cmd(), str(cfg)], capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.returncode == 2, r.stderr
    assert "pipeline.jsonl_path: cannot open for appending" in r.stderr
    assert "Traceback" not in r.stderr
