"""What the demo writes into its work dir: configs, the static inventory, the two model versions,
and where each party's certificate and the release key go.

Everything a child process reads comes from here, as plain YAML and JSON files an operator could
have written (docs/demo.md lists the layout), so a kept work dir (``--keep``) can be inspected
or replayed by hand. The demo runs the secure setup, not a shortcut: every party has its own
certificate from the demo's CA (``edge-hub pki``), the broker takes TLS with client
certificates and the K3s ACL (``edge_agent.contract.acl.site_acl``), the hub serves HTTPS with
tokens, agents download with their certificates, and every model version is signed.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from edge_agent.contract import acl

ROOT = Path(__file__).resolve().parents[1]
SOURCE_MODEL = ROOT / "models" / "out" / "efficientnet-lite0"
VIDEO = ROOT / "models" / "out" / "samples" / "bikes.mp4"
MODEL = "classifier"
NODES = ("edge-1", "edge-2", "edge-3")
CAMERA = "cam0"
LABEL_PREFIX = "edge.ai"


@dataclass(frozen=True)
class Party:
    """One certificate the demo issues: ``edge-hub pki issue NAME --role ROLE --out pki/DIR``."""

    dir: str
    name: str
    role: str
    #: Server certificates name what clients dial.
    extra: tuple[str, ...] = ()

    def files(self, pki: Path) -> dict[str, Path]:
        """``ca_file``, ``cert_file`` and ``key_file`` as ``edge-hub pki issue`` writes them."""
        out = pki / self.dir
        return {"ca_file": out / "ca.crt", "cert_file": out / "tls.crt",
                "key_file": out / "tls.key"}


_LOOPBACK = ("--ip", "127.0.0.1", "--dns", "localhost")
BROKER = Party("broker", "mosquitto", "server", _LOOPBACK)
HUB_HTTPS = Party("hub-https", "edge-hub", "server", _LOOPBACK)
#: The hub's MQTT identity and the two consumers: the names the K3s ACL lists, so the demo's
#: broker runs the K3s ACL file unchanged.
HUB_MQTT = Party("hub-mqtt", acl.SITE_HUBS[0], "hub")
WATCHER = Party("dashboard", "consumer:dashboard", "consumer")
OPERATOR = Party("operator", "consumer:operator", "consumer")


def parties() -> list[Party]:
    """Every certificate the demo issues, the agents' last."""
    assert {WATCHER.name, OPERATOR.name} <= set(acl.SITE_CONSUMERS)
    return [BROKER, HUB_HTTPS, HUB_MQTT, WATCHER, OPERATOR,
            *(Party(f"node-{n}", n, "agent") for n in NODES)]


def node_party(node: str) -> Party:
    """The agent certificate of ``node``."""
    return Party(f"node-{node}", node, "agent")


def missing_inputs() -> list[Path]:
    """Files built by ``scripts/setup.sh`` that the demo needs and cannot find."""
    need = (SOURCE_MODEL / "model.onnx", SOURCE_MODEL / "manifest.json", VIDEO)
    return [p for p in need if not p.is_file()]


def dump(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as YAML."""
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def write_token(path: Path) -> None:
    """A fresh random API token, readable by its owner only from the start."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(secrets.token_urlsafe(24) + "\n")


def write_inventory(path: Path, assigned: str | None) -> None:
    """The hub's static inventory; ``assigned`` labels every node with that model version."""
    labels = {f"{LABEL_PREFIX}/camera-node": "true", "site": "demo"}
    if assigned is not None:
        labels[f"{LABEL_PREFIX}/model.{MODEL}"] = assigned
    tmp = path.with_name(f".{path.name}.tmp")
    dump(tmp, {"nodes": [{"name": n, "labels": labels} for n in NODES]})
    os.replace(tmp, path)  # the hub polls the file: it must never read half of it


def hub_config(*, hub_dir: Path, port: int, broker_port: int, token_file: Path,
               inventory: Path, pki: Path, signing_key: Path) -> dict[str, Any]:
    """``edge-hub serve --config``: HTTPS with its server certificate, the fleet CA for the
    agents' download certificates, its own MQTT identity, signatures required, static cluster
    backend, quick ticks for a short demo."""
    https = HUB_HTTPS.files(pki)
    return {
        "api": {"host": "127.0.0.1", "port": port, "token_file": str(token_file),
                "tls_cert_file": str(https["cert_file"]), "tls_key_file": str(https["key_file"]),
                "client_ca_file": str(https["ca_file"])},
        "storage": {"data_dir": str(hub_dir / "data")},
        "mqtt": {"host": "127.0.0.1", "port": broker_port,
                 **{k: str(v) for k, v in HUB_MQTT.files(pki).items()}},
        "signing": {"require_signed": True, "public_key_files": [str(signing_key)]},
        "cluster": {"backend": "static", "inventory_file": str(inventory),
                    "label_prefix": LABEL_PREFIX, "inventory_poll_s": 0.5},
        # a node is offline after 10 s of silence (the agents report every second here)
        "telemetry": {"window_s": 120.0, "offline_after_s": 10.0},
        "rollouts": {"tick_s": 0.5, "startup_grace_s": 1.0},
        "log": {"json_lines": True},
    }


def motion_config(node: str) -> dict[str, Any]:
    """Motion gating on the first node's camera only (docs/pipeline.md), off elsewhere: the demo
    shows both, and ``frames_still`` in its telemetry and ``/metrics``. The street in the sample
    video moves almost all the time, so the gated camera still publishes most frames; a 1 s
    keep-alive re-checks it when it does not."""
    return {"enabled": True, "keepalive_s": 1.0} if node == NODES[0] else {"enabled": False}


def agent_config(node: str, *, agent_dir: Path, fps: float, broker_port: int, http_port: int,
                 hub_url: str, pki: Path, signing_key: Path) -> dict[str, Any]:
    """``edge-agent run --config`` for one node: the looping sample video, no model until the
    hub assigns one, results through the outbox to the broker; its own certificate on MQTT and
    for downloads, signatures checked."""
    own = {k: str(v) for k, v in node_party(node).files(pki).items()}
    return {
        "node": node,
        "log": {"json_lines": True},
        # CUDA when this machine has it; TensorRT would spend minutes building engines
        "engine": {"providers": ["cuda", "cpu"], "intra_op_threads": 1, "warmup_runs": 1},
        "cameras": [{"name": CAMERA, "url": str(VIDEO), "model": MODEL, "loop": True,
                     "fps_cap": fps, "motion": motion_config(node)}],
        # three agents share this machine: one worker each, no startup measurement
        "pipeline": {"workers": 1, "max_batch": 1, "sink": "mqtt"},
        "mqtt": {"host": "127.0.0.1", "port": broker_port, "telemetry_interval_s": 1.0,
                 "reconnect_min_s": 0.2, "reconnect_max_s": 2.0, **own},
        "outbox": {"path": str(agent_dir / "outbox.sqlite3")},
        "http": {"host": "127.0.0.1", "port": http_port},
        "hub": {"url": hub_url, "cache_dir": str(agent_dir / "models"), **own,
                "public_key_file": str(signing_key)},
        "model_sync": {"reload_poll_s": 0},
        "shutdown_timeout_s": 5.0,
    }


def broker_config(workdir: Path, port: int, pki: Path) -> Path:
    """mosquitto as on K3s (k3s/base/mosquitto): TLS on ``127.0.0.1:port``, a client
    certificate from the demo's CA required, its name the user name and the client id, the K3s
    ACL; its config, ACL and log in ``workdir``. Returns the config file."""
    workdir.mkdir(parents=True, exist_ok=True)
    server = BROKER.files(pki)
    (workdir / "acl").write_text(acl.site_acl(), encoding="utf-8")
    conf = workdir / "mosquitto.conf"
    conf.write_text("\n".join([
        # started by root, mosquitto would switch to its own user, who cannot read the key
        # (mode 0600, ours); started by anyone else this line does nothing
        f"user {getpass.getuser()}",
        "per_listener_settings false",
        f"listener {port} 127.0.0.1",
        f"cafile {server['ca_file']}",
        f"certfile {server['cert_file']}",
        f"keyfile {server['key_file']}",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        "allow_anonymous false",
        f"acl_file {workdir / 'acl'}",
        "log_dest stdout",
        "log_type error", "log_type warning", "log_type notice",
        # three agents publishing QoS 1 results: let them pipeline
        "max_inflight_messages 1000",
        "max_queued_messages 100000",
    ]) + "\n", encoding="utf-8")
    return conf


def _write_manifest(folder: Path, source: dict[str, Any], version: str, sha256: str) -> None:
    manifest = {**source, "name": MODEL, "version": version, "sha256": sha256,
                "file": "model.onnx"}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n",
                                          encoding="utf-8")


def prepare_models(models_dir: Path) -> dict[str, Path]:
    """``{version: model file}`` to push: v1 is the built model (linked) with its manifest; v2
    the same network re-exported with ONNX Runtime's basic graph optimizations (constant
    folding, redundant nodes removed): different bytes and sha256, identical outputs."""
    source = json.loads((SOURCE_MODEL / "manifest.json").read_text(encoding="utf-8"))
    v1 = models_dir / MODEL / "1"
    v1.mkdir(parents=True)
    (v1 / "model.onnx").symlink_to(SOURCE_MODEL / "model.onnx")
    _write_manifest(v1, source, "1", source["sha256"])
    v2 = models_dir / MODEL / "2"
    v2.mkdir(parents=True)
    import onnxruntime as ort  # noqa: PLC0415 - a second's work, only here

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(v2 / "model.onnx")
    opts.intra_op_num_threads = 1
    ort.InferenceSession(str(SOURCE_MODEL / "model.onnx"), opts,
                         providers=["CPUExecutionProvider"])
    digest = hashlib.sha256((v2 / "model.onnx").read_bytes()).hexdigest()
    _write_manifest(v2, source, "2", digest)
    return {"1": v1 / "model.onnx", "2": v2 / "model.onnx"}
