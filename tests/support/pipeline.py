"""Helpers for the pipeline, HTTP and supervisor tests: settings, a recording sink, polling."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from edge_agent.config import AgentSettings, load_settings
from edge_agent.streaming.sinks import SeqCounter
from tests.support.broker import free_port


def agent_settings(
    tmp_path: Path,
    models_dir: Path,
    cameras: list[dict[str, Any]],
    *,
    models: tuple[str, ...] = ("yolov8-head",),
    pipeline: dict[str, Any] | None = None,
    http: bool | dict[str, Any] = True,
    **overrides: Any,
) -> AgentSettings:
    """Settings for an agent on generated models, a JSON-lines sink in ``tmp_path``."""
    pipe = {"sink": "jsonl", "jsonl_path": str(tmp_path / "results.jsonl"),
            "workers": 2, "max_batch": 1, "ready_frame_age_s": 2.0}
    pipe.update(pipeline or {})
    data: dict[str, Any] = {
        "node": "test-node",
        "models": [{"name": m, "manifest": str(models_dir / m / "manifest.json")}
                   for m in models],
        "cameras": cameras,
        "pipeline": pipe,
        "http": (http if isinstance(http, dict)
                 else {"host": "127.0.0.1", "port": free_port() if http else 0}),
        "hub": {"cache_dir": str(tmp_path / "model-cache")},
        "engine": {"warmup_runs": 1},
        "shutdown_timeout_s": 10,
    }
    data.update(overrides)
    return load_settings(None, **data)


class RecordingSink:
    """A ``ResultSink`` that keeps results in memory (seq assigned like the real sinks)."""

    def __init__(self) -> None:
        self.results: list[dict[str, Any]] = []
        self.sink_times: list[float] = []
        self._seq = SeqCounter()
        self.closed = False

    def publish(self, result: dict[str, Any]) -> int:
        seq = self._seq.next(result["camera"])
        result["seq"] = seq
        self.results.append(result)
        self.sink_times.append(time.time())
        return seq

    async def aclose(self) -> None:
        self.closed = True

    def by_camera(self, camera: str) -> list[dict[str, Any]]:
        return [r for r in self.results if r["camera"] == camera]
