"""Config reload on a running agent: models and cameras change, a bad file changes nothing."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from edge_agent.app.compose import Agent
from edge_agent.app.reload import ConfigReloader
from edge_agent.config import load_settings
from edge_agent.streaming.sinks import JsonLinesSink
from models import generate
from tests.support import modelsync as ms
from tests.support.waiting import until

PATTERN = "test://pattern?width=320&height=240&fps=20"




def _config(tmp: Path, models: dict[str, Path], cameras: dict[str, str], **extra: Any) -> Path:
    cfg = {
        "node": "n1",
        "engine": {"providers": ["cpu"], "warmup_runs": 1},
        "models": [{"name": n, "manifest": str(p)} for n, p in models.items()],
        "cameras": [{"name": c, "url": PATTERN, "model": m} for c, m in cameras.items()],
        "pipeline": {"workers": 1, "max_batch": 1, "sink": "jsonl",
                     "jsonl_path": str(tmp / "results.jsonl")},
        "http": {"port": 0},
        "hub": {"cache_dir": str(tmp / "cache")},
        "model_sync": {"probation_frames": 3, "probation_timeout_s": 2.0, "reload_poll_s": 0.1},
        **extra,
    }
    path = tmp / "agent.yaml"
    tmp_path = path.with_suffix(".tmp")
    tmp_path.write_text(yaml.safe_dump(cfg))
    os.replace(tmp_path, path)  # like a ConfigMap update: the file changes in one step
    return path


class Running:
    def __init__(self, agent: Agent, sink: JsonLinesSink, reloader: ConfigReloader) -> None:
        self.agent, self.sink, self.reloader = agent, sink, reloader

    def versions(self, camera: str) -> list[str]:
        lines = self.sink.path.read_bytes().splitlines() if self.sink.path.exists() else []
        rows = [orjson.loads(x) for x in lines]
        return [r["model"]["version"] for r in rows if r["camera"] == camera]


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    v1 = ms.version_of(tmp_path / "art", "det", "1", anchors=64)
    path = _config(tmp_path, {"det": v1.manifest_path}, {"cam0": "det"})
    settings = load_settings(path)
    sink = await JsonLinesSink(tmp_path / "results.jsonl", flush_interval_s=0.05).open()
    agent = Agent(settings, sink=sink, config_path=path)
    await agent.start()
    reloader = agent.reloader
    assert isinstance(reloader, ConfigReloader)
    await asyncio.wait_for(reloader.primed.wait(), 10)
    try:
        yield Running(agent, sink, reloader)
    finally:
        await agent.stop()
        await sink.aclose()


async def test_file_change_swaps_a_model_and_adds_a_camera(
    running: Running, tmp_path: Path
) -> None:
    agent = running.agent
    await until(lambda: "1" in running.versions("cam0"), what="results of version 1")
    v2 = ms.version_of(tmp_path / "art", "det", "2", anchors=65)
    cls = ms.Artifact("cls", "1", generate.tiny_classifier(tmp_path / "art" / "cls-1", "cls", "1"))
    _config(tmp_path, {"det": v2.manifest_path, "cls": cls.manifest_path},
            {"cam0": "det", "cam1": "cls"})
    await until(lambda: agent.slots["det"].version == "2", what="det switched to 2")
    await until(lambda: "1" in running.versions("cam1"), what="results from the new camera")
    await until(lambda: running.versions("cam0")[-1:] == ["2"], what="cam0 on version 2")
    assert set(agent.pipeline.cameras) == {"cam0", "cam1"}
    assert running.reloader.counters["reloads"] == 1
    # the camera goes away again on SIGHUP after the edit
    _config(tmp_path, {"det": v2.manifest_path, "cls": cls.manifest_path}, {"cam0": "det"})
    running.reloader.trigger()
    await until(lambda: set(agent.pipeline.cameras) == {"cam0"}, what="cam1 stopped")


async def test_bad_file_is_refused_and_nothing_changes(running: Running, tmp_path: Path) -> None:
    agent = running.agent
    path = running.reloader.path
    good = path.read_text()
    path.write_text(good + "\nunknown_key: 1\ncameras: 5\n")
    assert await running.reloader.reload() is False
    assert running.reloader.counters["refused"] == 1
    assert agent.slots["det"].version == "1" and set(agent.pipeline.cameras) == {"cam0"}
    # a section that needs a restart is reported, the rest applied
    path.write_text(good.replace("port: 0", "port: 0\n  host: 127.0.0.2"))
    assert await running.reloader.reload() is True
    assert running.reloader.counters["restart_required"] == 1


async def test_sighup_triggers_a_reload(running: Running, tmp_path: Path) -> None:
    running.reloader.install_sighup()
    try:
        n = running.reloader.counters["reloads"]
        os.kill(os.getpid(), signal.SIGHUP)
        await until(lambda: running.reloader.counters["reloads"] == n + 1, what="reload")
    finally:
        asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
