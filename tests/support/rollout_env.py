"""Shared set-up for the rollout tests: a real registry with real model versions, the fake
Kubernetes API with camera nodes, a real broker, simulated agents and an in-process control plane.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from hub.cli import main
from hub.config import HubSettings
from hub.registry.service import Registry
from hub.server.control import ControlPlane
from tests.support.broker import HUB, Broker, wait_port
from tests.support.fake_k8s import FakeKube
from tests.support.hub_client import client_ssl, default_pki, tls_api
from tests.support.inproc import Result, run_main
from tests.support.postgres import storage_for
from tests.support.sim_agents import Behaviour, SimAgent

CAM = "edge.ai/camera-node"
MODEL = "det"
LABEL = f"edge.ai/model.{MODEL}"
TOKEN = "s3cret-token"


class ManualClock:
    """A wall clock that tests move by hand (deadlines, bake times, silence)."""

    def __init__(self, start: float | None = None) -> None:
        self.now = start if start is not None else time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def hub_settings(data_dir: Path, *, broker: Broker | None, prefix: str,
                 kubeconfig: Path | None = None, inventory: Path | None = None,
                 **extra: Any) -> HubSettings:
    """Settings for a test hub: fast ticks, short retries, the given cluster backend, the hub's
    identity on ``broker`` (None: a broker that is never reached, for tests without MQTT)."""
    cluster: dict[str, Any] = {"api_timeout_s": 0.5, "api_backoff_s": 0.01,
                               "api_backoff_max_s": 0.05, "watch_timeout_s": 5,
                               "inventory_poll_s": 0.05}
    if kubeconfig is not None:
        cluster |= {"backend": "kubernetes", "kubeconfig": kubeconfig}
    else:
        cluster |= {"backend": "static", "inventory_file": inventory}
    data: dict[str, Any] = {
        "storage": storage_for(data_dir),
        "api": {"token": TOKEN, "host": "127.0.0.1", "port": 0,
                "public_url": "http://hub.test:8081"},
        "mqtt": {**(broker.settings(HUB) if broker is not None else {"port": 1}),
                 "topic_prefix": prefix},
        "cluster": cluster,
        "telemetry": {"window_s": 60, "offline_after_s": 30},
        "rollouts": {"tick_s": 0.05, "startup_grace_s": 0.3},
    }
    for section, values in extra.items():
        data[section] = {**data.get(section, {}), **values}
    return HubSettings(**data)


async def push_version(reg: Registry, models_dir: Path, version: str, *,
                       source: str = "tiny-classifier", name: str = MODEL) -> str:
    """Push a built model under ``name``/``version`` (its manifest renamed); its sha256."""
    folder = models_dir / source
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["name"], manifest["version"] = name, version
    staged = await reg.stage()
    await staged.write((folder / manifest["file"]).read_bytes())
    await staged.finish()
    v, _ = await reg.push(name, version, manifest_bytes=json.dumps(manifest).encode(),
                          staged=staged)
    return v.sha256


def add_camera_nodes(kube: FakeKube, names: list[str], version: str | None = "1.0",
                     **labels: str) -> None:
    for n in names:
        lab = {CAM: "true", **labels}
        if version is not None:
            lab[LABEL] = version
        kube.add_node(n, lab)


class Fleet:
    """Simulated agents by node name, stopped together."""

    def __init__(self, broker: Broker, prefix: str) -> None:
        self.broker, self.prefix = broker, prefix
        self.agents: dict[str, SimAgent] = {}

    def add(self, name: str, *, version: str | None = "1.0", behaviour: Behaviour | None = None,
            start: bool = True, interval_s: float = 0.05) -> SimAgent:
        a = SimAgent(self.broker, self.prefix, name, models={MODEL: version} if version else {},
                     behaviour=behaviour, interval_s=interval_s)
        self.agents[name] = a
        if start:
            a.start()
        return a

    def stop(self) -> None:
        for a in self.agents.values():
            a.stop()


async def control_plane(settings: HubSettings, registry: Registry,
                        clock: Callable[[], float] = time.time) -> ControlPlane:
    cp = ControlPlane(settings, registry, clock=clock)
    await cp.start()
    await cp.controller.ready.wait()
    return cp


ROOT = Path(__file__).resolve().parents[2]


def write_hub_config(path: Path, *, data_dir: Path, port: int, token_file: Path, broker: Broker,
                     prefix: str, kubeconfig: Path,
                     storage: dict[str, Any] | None = None) -> Path:
    """A YAML config for ``edge-hub serve`` in a subprocess (fast ticks, short retries);
    ``storage`` replaces the storage settings (replicas sharing a PostgreSQL database)."""
    cfg = {
        "log": {"level": "info", "json_lines": True},
        "api": {"host": "127.0.0.1", "port": port, "token_file": str(token_file),
                "public_url": "http://hub.test:8081", **tls_api()},
        "storage": storage or storage_for(data_dir),
        "mqtt": {**{k: str(v) if isinstance(v, Path) else v
                    for k, v in broker.settings(HUB).items()}, "topic_prefix": prefix},
        "cluster": {"backend": "kubernetes", "kubeconfig": str(kubeconfig),
                    "api_timeout_s": 0.5, "api_backoff_s": 0.01, "api_backoff_max_s": 0.05,
                    "watch_timeout_s": 5},
        "telemetry": {"window_s": 60, "offline_after_s": 30},
        "rollouts": {"tick_s": 0.05, "startup_grace_s": 0.3},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


class HubProc:
    """``edge-hub serve --config`` as a child process that tests can ``kill -9``."""

    def __init__(self, config: Path, port: int, log_path: Path) -> None:
        self.config, self.port, self.log_path = config, port, log_path
        self.url = f"https://127.0.0.1:{port}"
        self.proc: Any = None

    def start(self) -> HubProc:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hub", "serve", "--config", str(self.config)],
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)})
        deadline = time.monotonic() + 30
        while True:
            try:
                wait_port(self.port, timeout=0.2)
                break
            except TimeoutError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("hub did not start:\n" + self.log_text()[-3000:]) \
                        from None
        return self

    def kill9(self) -> None:
        """A crash: SIGKILL, no shutdown at all."""
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return 0 if self.proc is None else int(self.proc.returncode)
        self.proc.terminate()
        try:
            return int(self.proc.wait(25))
        except Exception:
            self.proc.kill()
            return int(self.proc.wait(10))

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def api(self, method: str, path: str, body: Any = None,
            timeout: float = 10) -> tuple[int, Any]:
        """One JSON call to this hub as admin: (status, parsed body)."""
        req = urllib.request.Request(self.url + path, method=method,
                                     headers={"Authorization": f"Bearer {TOKEN}",
                                              "Content-Type": "application/json"},
                                     data=json.dumps(body).encode() if body is not None else None)
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=client_ssl()) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")


def cli(hub_url: str, *args: str, timeout: float = 60) -> Any:
    """Run ``edge-hub ARGS`` in a subprocess against ``hub_url``; the CompletedProcess."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGE_HUB_URL": hub_url,
           "EDGE_HUB_TOKEN": TOKEN, "EDGE_HUB_CA_FILE": str(default_pki().ca_file)}
    return subprocess.run([sys.executable, "-m", "hub", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout, check=False)


def cli_inproc(hub_url: str, *args: str) -> Result:
    """``edge-hub ARGS`` in this process (same code path as the console script, minus the
    interpreter start-up); returns the exit code, stdout and stderr."""
    return run_main(main, args, env={"EDGE_HUB_URL": hub_url, "EDGE_HUB_TOKEN": TOKEN,
                                     "EDGE_HUB_CA_FILE": str(default_pki().ca_file)})
