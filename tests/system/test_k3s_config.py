"""The K3s configs against the programs: every setting the manifests set exists, and each
program's ConfigMap loads and names files the pod really mounts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import BaseModel

from edge_agent import config as agent_config
from hub import config as hub_config
from tests.system.test_k3s import (
    NAMESPACE,
    Obj,
    agent_objects,
    container,
    find,
    mounts_of,
    workloads,
)


def _settings_paths(model: type[BaseModel], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for name, field in model.model_fields.items():
        out.add(prefix + name.upper())
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out |= _settings_paths(ann, prefix + name.upper() + "__")
    return out


@pytest.mark.parametrize("target", ["base", "gpu", "mig", "ha", "ha-migrate"])
def test_env_settings_exist(rendered: dict[str, list[Obj]], target: str) -> None:
    known = {
        "EDGE_AGENT_": _settings_paths(agent_config.AgentSettings),
        "EDGE_HUB_": _settings_paths(hub_config.HubSettings),
    }
    for _, spec in workloads(rendered[target]):
        for c in spec["containers"]:
            for e in c.get("env", []):
                for prefix, names in known.items():
                    if e["name"].startswith(prefix):
                        assert e["name"][len(prefix) :] in names, e["name"]


def configmap_files(mounts: dict[str, Obj]) -> set[str]:
    return {
        f"{path}/{item['path']}"
        for path, v in mounts.items()
        if "configMap" in v
        for item in v["configMap"].get("items", [])
    }


def secret_files(mounts: dict[str, Obj]) -> set[str]:
    return {
        f"{path}/{item['path']}"
        for path, v in mounts.items()
        if "secret" in v
        for item in v["secret"]["items"]
    }


def test_agent_config_loads_and_matches_the_pod(
    base: list[Obj], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    objs = base
    _, spec, c = agent_objects(objs)
    mounts = mounts_of(c, spec)
    cfg_path = c["args"][c["args"].index("--config") + 1]
    cm_name = mounts[str(Path(cfg_path).parent)]["configMap"]["name"]
    cm = find(objs, "ConfigMap", cm_name)
    (tmp_path / "config.yaml").write_text(cm["data"][Path(cfg_path).name])
    for k in list(os.environ):
        if k.startswith("EDGE_AGENT_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("NODE_NAME", "box-1")
    for e in c["env"]:
        if "value" in e:
            monkeypatch.setenv(e["name"], e["value"])
    s = agent_config.load_settings(tmp_path / "config.yaml")
    from edge_agent.config import check_settings

    check_settings(s)  # the cross-field checks the agent makes before it starts
    assert s.node == "box-1"
    assert s.http.port == 8080 and s.http.host == "0.0.0.0"
    svc = find(objs, "Service", "mosquitto")
    assert s.mqtt.host == f"mosquitto.{NAMESPACE}.svc.cluster.local"
    assert s.mqtt.port == svc["spec"]["ports"][0]["port"]
    secrets = secret_files(mounts)
    # MQTT over TLS: the fleet CA from its ConfigMap, the node's own certificate on its state
    # volume (no password, no shared identity)
    assert s.mqtt.tls and s.mqtt.username is None and s.mqtt.password_file is None
    assert str(s.mqtt.ca_file) in configmap_files(mounts)
    state_dir = next(p for p, v in mounts.items() if "hostPath" in v)
    for f in (s.mqtt.cert_file, s.mqtt.key_file):
        assert f is not None and Path(f).is_relative_to(state_dir), f
    # signatures are checked before a model loads
    assert str(s.hub.public_key_file) in configmap_files(mounts)
    # no API token on a box: the agent downloads with its certificate (test_k3s_security.py)
    assert s.hub.token_file is None and not secrets
    hub_port = find(objs, "Service", "edge-hub")["spec"]["ports"][0]["port"]
    assert s.hub.url == f"https://edge-hub.{NAMESPACE}.svc.cluster.local:{hub_port}"
    # everything the agent keeps lives on the hostPath
    state = next(p for p, v in mounts.items() if "hostPath" in v)
    for p in (s.outbox.path, s.hub.cache_dir, s.engine.trt_cache_dir):
        assert Path(p).is_relative_to(state), p
    assert s.shutdown_timeout_s < spec["terminationGracePeriodSeconds"]


def test_hub_config_loads_and_matches_the_pod(
    base: list[Obj], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dep = find(base, "Deployment", "edge-hub")
    spec = dep["spec"]["template"]["spec"]
    c = container(spec, "hub")
    mounts = mounts_of(c, spec)
    cfg_path = c["args"][c["args"].index("--config") + 1]
    cm = find(base, "ConfigMap", mounts[str(Path(cfg_path).parent)]["configMap"]["name"])
    (tmp_path / "hub.yaml").write_text(cm["data"][Path(cfg_path).name])
    for k in list(os.environ):
        if k.startswith("EDGE_HUB_"):
            monkeypatch.delenv(k)
    s = hub_config.load_settings(tmp_path / "hub.yaml")
    # MQTT: TLS to the broker's service with the hub's own certificate, mounted from its Secret
    svc = find(base, "Service", "mosquitto")
    assert s.mqtt.tls and s.mqtt.port == svc["spec"]["ports"][0]["port"]
    mqtt_files = {str(s.mqtt.ca_file), str(s.mqtt.cert_file), str(s.mqtt.key_file)}
    assert mqtt_files <= secret_files(mounts)
    assert s.mqtt.username is None and s.mqtt.password_file is None
    # signatures required, against the release key's public half
    assert s.signing.require_signed
    keys = {str(k) for k in s.signing.public_key_files}
    assert keys and keys <= configmap_files(mounts)
    assert s.api.host == "0.0.0.0" and s.api.port == 8081
    assert s.cluster.backend == "kubernetes" and s.cluster.kubeconfig is None
    assert s.public_url() == f"https://edge-hub.{NAMESPACE}.svc.cluster.local:8081"
    secrets = secret_files(mounts)
    assert s.api.tokens and {str(t.file) for t in s.api.tokens} <= secrets
    assert "persistentVolumeClaim" in mounts[str(s.storage.data_dir)]
    assert s.mqtt.host == f"mosquitto.{NAMESPACE}.svc.cluster.local"


# ------------------------------------------------------------------------------------- overlays
