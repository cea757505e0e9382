"""``edge-agent run`` says what a person starting it should know: no config, nothing to do,
state on the default host paths."""

from __future__ import annotations

from pathlib import Path

import orjson

from edge_agent import config
from edge_agent.commands.run import startup_warnings
from tests.support.agent_process import AgentProcess, agent_config

MODELS = Path(__file__).resolve().parents[3] / "models" / "out"


def test_no_config_at_all_is_said_with_the_paths_it_writes() -> None:
    found = startup_warnings(config.AgentSettings(), None, {})
    assert any("no --config" in w for w in found)
    assert any("/var/lib/edge-agent/outbox.sqlite3" in w for w in found)
    assert any("no cameras" in w for w in found)
    # an environment-only setup is a choice: no "no --config" line, and its paths are its own
    quiet = startup_warnings(config.AgentSettings(), None, {"EDGE_AGENT_NODE": "n"})
    assert not any("no --config" in w for w in quiet)


def test_a_configured_agent_is_not_warned(tmp_path: Path) -> None:
    cfg = config.AgentSettings.model_validate({
        "models": [{"name": "m", "manifest": str(tmp_path / "m.json")}],
        "cameras": [{"name": "c", "url": "test://pattern", "model": "m"}],
        "outbox": {"path": str(tmp_path / "o.sqlite3")}, "hub": {"cache_dir": str(tmp_path)}})
    assert startup_warnings(cfg, str(tmp_path / "agent.yaml"), {}) == []


def test_a_running_agent_without_cameras_logs_the_warning(tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path, agent_config(tmp_path, MODELS)).start()
    try:
        lines = [orjson.loads(x) for x in agent.log_text().splitlines() if x.startswith("{")]
    finally:
        agent.stop()
    warned = [x for x in lines if x.get("event") == "startup_warning"]
    assert any("no cameras" in x["message"] for x in warned), agent.log_text()[-2000:]
