"""A real ``edge-agent run`` child process for the attack tests: its config written as YAML, its
log kept, its HTTP port waited for, and its peak memory read from the kernel (``VmHWM``)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from tests.support import children
from tests.support.broker import free_port

ROOT = Path(__file__).resolve().parents[2]


def _plain(value: Any) -> Any:
    """Settings with ``Path`` values as YAML can write them."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def agent_config(tmp: Path, models_dir: Path, *, models: tuple[str, ...] = ("tiny-classifier",),
                 **sections: Any) -> dict[str, Any]:
    """A small agent: generated models, results to a JSON-lines file, HTTP on loopback."""
    cfg: dict[str, Any] = {
        "node": "attacked-node",
        "models": [{"name": m, "manifest": str(models_dir / m / "manifest.json")}
                   for m in models],
        "cameras": [],
        "engine": {"providers": ["cpu"], "warmup_runs": 1},
        "pipeline": {"sink": "jsonl", "jsonl_path": str(tmp / "results.jsonl"), "workers": 1,
                     "max_batch": 1},
        "outbox": {"path": str(tmp / "outbox.sqlite3")},
        "http": {"host": "127.0.0.1", "port": free_port()},
        "hub": {"cache_dir": str(tmp / "cache")},
        "log": {"json_lines": True},
        "shutdown_timeout_s": 5,
    }
    for key, value in sections.items():
        cfg[key] = {**cfg[key], **value} if isinstance(cfg.get(key), dict) else value
    return cfg


class AgentProcess:
    """``python -m edge_agent run --config`` with ``config``; stdout and stderr in one log."""

    def __init__(self, tmp: Path, config: dict[str, Any]) -> None:
        self.config = config
        self.path = tmp / "agent.yaml"
        self.path.write_text(yaml.safe_dump(_plain(config)))
        self.log_path = tmp / "agent.log"
        self.port = int(config["http"]["port"])
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, ready: str = "/healthz", timeout: float = 60) -> AgentProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
        env["PYTHONPATH"] = str(ROOT)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edge_agent", "run", "--config", str(self.path)],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.url + ready, timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("agent did not start:\n" + self.log_text()[-4000:])
            time.sleep(0.05)

    def status_kb(self, field: str) -> int:
        """A ``/proc/PID/status`` figure in kB (``VmHWM``: the peak RSS so far)."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)

    def peak_rss(self) -> int:
        """The process's peak resident memory so far, bytes."""
        return self.status_kb("VmHWM") * 1024

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> int | None:
        return None if self.proc is None else children.stop(self.proc)
