"""Restart to ready: `edge-agent run` from process start to `/readyz` 200, cold and restarted.

    .venv/bin/python bench/restart.py [--quick]

For each model (``models/out/tiny-classifier``, ``models/out/yolov8n-like``) one agent config,
as the DaemonSet runs it: one 1280x720 camera at 20 fps (the test pattern, so no file or
network decides), results to a real Mosquitto over TLS with the node's certificate, the outbox
and the model cache (where the stored calibration lives) in a folder that survives restarts.

- ``cold``: the baseline, in the same run: no stored calibration (the file removed), so the
  agent measures its layout before it is ready, as every start did before;
- ``restart``: the same agent started again: the stored layout is reused and measured again in
  the background after ready.

Each start is timed from ``Popen`` to the first ``/readyz`` 200 (polled every 5 ms), then the
agent gets SIGTERM and must exit 0. The agent's JSON log lines say where the time went
(interpreter and imports until its first line, model load, calibration, the rest until the
HTTP server listens) and prove that a restart measured nothing before it was ready. Cold and
restart alternate so a noisy neighbour hurts both; figures are medians. Writes
``bench/out/restart.json``; the last line is
``tiny_restart_s=... tiny_cold_s=... tiny_ratio=... yolo_restart_s=... yolo_cold_s=...
yolo_ratio=...``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_agent.app.compose import CALIBRATION_FILE  # noqa: E402
from tests.support.broker import Broker, free_port  # noqa: E402

MODELS = {"tiny": "tiny-classifier", "yolo": "yolov8n-like"}
NODE = "bench-node"
EXE = ROOT / ".venv" / "bin" / "edge-agent"


def config(work: Path, broker: Broker, model: str, port: int) -> Path:
    """The agent's YAML config for ``model`` with its state in ``work``."""
    data = {
        "node": NODE,
        "log": {"level": "info", "json_lines": True},
        "mqtt": {k: str(v) if isinstance(v, Path) else v
                 for k, v in broker.settings(NODE, topic_prefix="bench").items()},
        "outbox": {"path": str(work / "outbox.sqlite3")},
        "hub": {"cache_dir": str(work / "models")},
        "http": {"host": "127.0.0.1", "port": port},
        "models": [{"name": "m", "manifest": str(ROOT / "models/out" / model / "manifest.json")}],
        "cameras": [{"name": "cam0", "url": "test://pattern?width=1280&height=720&fps=20",
                     "model": "m"}],
    }
    path = work / "agent.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def start_once(cfg: Path, port: int) -> dict[str, Any]:
    """One start: seconds to ready, the phases from the log, the events before ready."""
    w0 = time.time()
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(EXE), "run", "--config", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/readyz"
    ready_s = None
    while proc.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    ready_s = time.perf_counter() - t0
                    break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.005)
    ready_at = w0 + ready_s if ready_s is not None else None
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    if ready_s is None or proc.returncode != 0:
        raise SystemExit(f"agent exited {proc.returncode} (ready: {ready_s}):\n{out[-3000:]}")
    events: list[tuple[float, str]] = []
    for line in out.splitlines():
        try:
            d = json.loads(line)
            ts = datetime.fromisoformat(d["timestamp"].replace("Z", "+00:00")).timestamp()
        except (ValueError, KeyError, TypeError):
            continue
        events.append((ts - w0, d["event"]))
    before = [e for t, e in events if ready_at is None or t + w0 <= ready_at]
    return {"ready_s": round(ready_s, 3), "phases": phases(events, ready_s),
            "measured_before_ready": "concurrency_measured" in before,
            "reused_before_ready": "concurrency_reused" in before,
            "rechecked": "concurrency_rechecked" in [e for _, e in events]}


def phases(events: list[tuple[float, str]], ready_s: float) -> dict[str, float]:
    """Seconds per start-up phase, from the first time each event appears."""
    at: dict[str, float] = {}
    for t, e in events:
        at.setdefault(e, t)
    first = events[0][0] if events else 0.0
    loaded = at.get("model_startup_loaded", first)
    chosen = at.get("concurrency_measured", at.get("concurrency_reused", loaded))
    listening = at.get("agent_started", chosen)
    return {"interpreter_and_imports": round(first, 3),
            "model_load": round(loaded - first, 3),
            "calibration": round(chosen - loaded, 3),
            "outbox_mqtt_pipeline_http": round(listening - chosen, 3),
            "until_ready": round(ready_s - listening, 3)}


def bench_model(short: str, model: str, broker: Broker, rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"bench-restart-{short}-") as tmp:
        work = Path(tmp)
        port = free_port()
        cfg = config(work, broker, model, port)
        stored = work / "models" / CALIBRATION_FILE
        start_once(cfg, port)  # warms the page cache and creates the outbox; not counted
        cold: list[dict[str, Any]] = []
        warm: list[dict[str, Any]] = []
        for r in range(rounds):
            stored.unlink(missing_ok=True)
            cold.append(start_once(cfg, port))
            warm.append(start_once(cfg, port))
            print(f"{short} round {r}: cold {cold[-1]['ready_s']:.2f} s, restart "
                  f"{warm[-1]['ready_s']:.2f} s", flush=True)
        assert all(c["measured_before_ready"] for c in cold), "a cold start reused something"
        assert all(w["reused_before_ready"] and not w["measured_before_ready"] for w in warm), \
            "a restart measured before it was ready"

    def med(runs: list[dict[str, Any]]) -> dict[str, Any]:
        keys = runs[0]["phases"]
        return {"ready_s": round(statistics.median(x["ready_s"] for x in runs), 3),
                "all_ready_s": [x["ready_s"] for x in runs],
                "phases": {k: round(statistics.median(x["phases"][k] for x in runs), 3)
                           for k in keys}}

    c, w = med(cold), med(warm)
    return {"model": model, "cold": c, "restart": w,
            "restart_over_cold": round(w["ready_s"] / c["ready_s"], 3),
            "rechecked_in_background": sum(x["rechecked"] for x in warm)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 rounds per model (under 60 s)")
    args = ap.parse_args()
    rounds = 2 if args.quick else 5
    load_before = os.getloadavg()
    out: dict[str, Any] = {"cpus": len(os.sched_getaffinity(0)), "rounds": rounds,
                           "loadavg_before": [round(x, 2) for x in load_before]}
    with tempfile.TemporaryDirectory(prefix="bench-restart-broker-") as btmp:
        broker = Broker(Path(btmp), persistence=False)
        broker.start()
        try:
            for short, model in MODELS.items():
                out[short] = bench_model(short, model, broker, rounds)
        finally:
            broker.stop()
    out["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    (ROOT / "bench" / "out").mkdir(exist_ok=True)
    (ROOT / "bench" / "out" / "restart.json").write_text(json.dumps(out, indent=2) + "\n")
    for short in MODELS:
        r = out[short]
        print(f"{short}: restart phases {r['restart']['phases']}")
        print(f"{short}: cold phases {r['cold']['phases']}")
    print(f"loadavg before: {out['loadavg_before']}; after: {out['loadavg_after']}")
    print(" ".join(f"{s}_restart_s={out[s]['restart']['ready_s']} {s}_cold_s="
                   f"{out[s]['cold']['ready_s']} {s}_ratio={out[s]['restart_over_cold']}"
                   for s in MODELS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
