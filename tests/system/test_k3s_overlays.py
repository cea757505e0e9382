"""The K3s overlays beyond the base: ``ha`` (hubs on PostgreSQL, with the migration Job) and
``tracking`` (the agent image with object tracking), rendered with kustomize."""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from hub import config as hub_config
from tests.system.test_k3s import (
    NAMESPACE,
    ROOT,
    Obj,
    agent_objects,
    container,
    find,
    mounts_of,
    workloads,
)

# ------------------------------------------------------------------ ha: the hub on PostgreSQL

#: What `kubectl apply -k k3s/overlays/ha -l ...` puts in place before the migration Job runs
#: (docs/deploy.md): the database and the shared artifacts claim, never a hub.
MIGRATION_SELECTOR = "app.kubernetes.io/component in (database,artifacts)"
PG = "edge-hub-postgresql"


def env_of(c: Obj) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


def claim_modes(objs: list[Obj], claim: str) -> list[str]:
    return find(objs, "PersistentVolumeClaim", claim)["spec"]["accessModes"]  # type: ignore[no-any-return]


def test_ha_runs_two_hubs_or_more_through_a_drain(rendered: dict[str, list[Obj]]) -> None:
    objs = rendered["ha"]
    dep = find(objs, "Deployment", "edge-hub")
    assert dep["spec"]["replicas"] >= 2
    # a new hub starts before an old one stops: the API never goes away during an update
    strategy = dep["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0
    hpa = find(objs, "HorizontalPodAutoscaler", "edge-hub")["spec"]
    assert hpa["minReplicas"] == 2 and hpa["maxReplicas"] >= hpa["minReplicas"]
    assert hpa["scaleTargetRef"]["name"] == "edge-hub"
    pdb = find(objs, "PodDisruptionBudget", "edge-hub")["spec"]
    assert pdb["minAvailable"] == 1 and pdb["minAvailable"] < hpa["minReplicas"]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert pdb["selector"]["matchLabels"].items() <= pod_labels.items()
    spec = dep["spec"]["template"]["spec"]
    (spread,) = spec["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["labelSelector"]["matchLabels"].items() <= pod_labels.items()
    c = container(spec, "hub")
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # the artifacts on a claim every replica mounts read-write; the base's RWO claim is gone
    data = mounts_of(c, spec)[str(hub_config.StorageSettings().data_dir)]
    assert claim_modes(objs, data["persistentVolumeClaim"]["claimName"]) == ["ReadWriteMany"]
    assert not [o for o in objs if o["kind"] == "PersistentVolumeClaim"
                and o["metadata"]["name"] == "edge-hub-data"]
    for o in objs:
        if o["kind"] not in {"Namespace", "ClusterRole", "ClusterRoleBinding"}:
            assert o["metadata"].get("namespace") == NAMESPACE, o["metadata"]["name"]
        assert o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "edge-inference"


def ha_hub_settings(
    objs: list[Obj], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[hub_config.HubSettings, dict[str, Obj]]:
    """The HA hub's settings as its pod loads them (ConfigMap + env), and its mounts."""
    spec = find(objs, "Deployment", "edge-hub")["spec"]["template"]["spec"]
    c = container(spec, "hub")
    mounts = mounts_of(c, spec)
    for k in list(os.environ):
        if k.startswith("EDGE_HUB_"):
            monkeypatch.delenv(k)
    for name, value in env_of(c).items():
        monkeypatch.setenv(name, value)
    cm = find(objs, "ConfigMap", mounts["/etc/edge-hub/config"]["configMap"]["name"])
    (tmp_path / "hub.yaml").write_text(cm["data"]["hub.yaml"])
    return hub_config.load_settings(tmp_path / "hub.yaml"), mounts


def test_ha_hubs_use_the_bundled_postgresql_over_verified_tls(
    rendered: dict[str, list[Obj]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    objs = rendered["ha"]
    s, mounts = ha_hub_settings(objs, tmp_path, monkeypatch)
    url = s.storage.database_url
    assert url is not None
    parts = urlsplit(url)
    assert parts.scheme == "postgresql"
    # no password in the URL: it comes from a file of a Secret, readable by the group only
    assert parts.username == "edge_hub" and parts.password is None
    assert ":" not in parts.netloc.rsplit("@", 1)[0]
    password = mounts[str(Path(str(s.storage.database_password_file)).parent)]["secret"]
    assert password["secretName"] == "edge-hub-database"
    assert password["defaultMode"] & 0o007 == 0
    # the host is the bundled server's Service, the user and database the ones initdb creates
    svc = find(objs, "Service", PG)
    assert parts.hostname == f"{PG}.{NAMESPACE}.svc.cluster.local"
    assert parts.port == svc["spec"]["ports"][0]["port"] == 5432
    sts = find(objs, "StatefulSet", PG)
    pg_env = env_of(container(sts["spec"]["template"]["spec"], "postgresql"))
    assert parts.path == "/" + pg_env["POSTGRES_DB"] and parts.username == pg_env["POSTGRES_USER"]
    # TLS, verified against the fleet CA bundle the hub already mounts
    query = parse_qs(parts.query)
    assert query["sslmode"] == ["verify-full"]
    (root,) = query["sslrootcert"]
    root_dir = mounts[str(Path(root).parent)]
    assert root_dir["configMap"]["name"] == "edge-ca"
    assert {i["path"] for i in root_dir["configMap"]["items"]} == {Path(root).name}
    # the artifacts stay on the data folder, now the shared claim
    data = mounts[str(s.storage.data_dir)]
    assert data["persistentVolumeClaim"]["claimName"] == "edge-hub-artifacts"


def test_postgresql_runs_as_a_small_sites_statefulset(rendered: dict[str, list[Obj]]) -> None:
    objs = rendered["ha"]
    sts = find(objs, "StatefulSet", PG)
    assert sts["spec"]["replicas"] == 1 and sts["spec"]["serviceName"] == PG
    svc = find(objs, "Service", PG)["spec"]
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    assert svc["selector"].items() <= pod_labels.items()
    spec = sts["spec"]["template"]["spec"]
    c = container(spec, "postgresql")
    # the official image, pinned to a release (the generic test checks non-root and limits)
    assert re.fullmatch(r"postgres:1[5-9]\.\d+-(bookworm|trixie)", c["image"]), c["image"]
    assert spec["securityContext"]["runAsUser"] == 999  # the image's postgres user
    assert spec["automountServiceAccountToken"] is False
    assert [p["containerPort"] for p in c["ports"]] == [5432]
    assert svc["ports"][0]["targetPort"] == c["ports"][0]["name"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        cmd = c[probe]["exec"]["command"]
        assert cmd[0] == "pg_isready" and cmd[cmd.index("-h") + 1] == "127.0.0.1", probe
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    vols = {v["name"]: v for v in spec["volumes"]}
    vols[claim["metadata"]["name"]] = {"persistentVolumeClaim": claim}
    mounts = {m["mountPath"]: vols[m["name"]] for m in c["volumeMounts"]}
    # the password from the Secret the hub reads too, never from a literal
    env = {e["name"]: e for e in c["env"]}
    assert "POSTGRES_PASSWORD" not in env
    pw_file = Path(env["POSTGRES_PASSWORD_FILE"]["value"])
    pw = mounts[str(pw_file.parent)]["secret"]
    assert pw["secretName"] == "edge-hub-database" and pw["defaultMode"] & 0o007 == 0
    assert {i["path"] for i in pw["items"]} == {pw_file.name}
    # data on its own claim, below the mount (a fresh volume's lost+found upsets initdb)
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert mounts[str(Path(env["PGDATA"]["value"]).parent)]["persistentVolumeClaim"] is claim
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"]["whenDeleted"] == "Retain"
    # TLS with files from the server's Secret, and no plain-TCP line in pg_hba.conf
    args = dict(a.split("=", 1) for a in c["args"] if "=" in a)
    assert args["ssl"] == "on"
    tls = mounts[str(Path(args["ssl_cert_file"]).parent)]["secret"]
    assert tls["secretName"] == f"{PG}-tls" and tls["defaultMode"] & 0o007 == 0
    assert {args["ssl_cert_file"], args["ssl_key_file"]} == {
        f"{Path(args['ssl_cert_file']).parent}/{i['path']}" for i in tls["items"]}
    hba_path = Path(args["hba_file"])
    hba_cm = find(objs, "ConfigMap", mounts[str(hba_path.parent)]["configMap"]["name"])
    hba = [ln.split() for ln in hba_cm["data"][hba_path.name].splitlines()
           if ln.strip() and not ln.startswith("#")]
    assert {ln[0] for ln in hba} == {"local", "hostssl"}
    assert all(ln[-1] == "scram-sha-256" for ln in hba if ln[0] == "hostssl")
    # the writable places of a read-only root: the socket folder, /tmp, shared memory
    assert {"/var/run/postgresql", "/tmp", "/dev/shm"} <= set(mounts)


def test_only_the_hub_reaches_postgresql(rendered: dict[str, list[Obj]]) -> None:
    objs = rendered["ha"]
    pols = {o["metadata"]["name"]: o["spec"] for o in objs if o["kind"] == "NetworkPolicy"}
    pg_labels = find(objs, "StatefulSet", PG)["spec"]["template"]["metadata"]["labels"]

    def selects_pg(spec: Obj) -> bool:
        sel = spec["podSelector"]
        if sel == {}:
            return True
        if "matchLabels" in sel:
            return bool(sel["matchLabels"].items() <= pg_labels.items())
        return any(pg_labels.get(e["key"]) in e["values"] for e in sel["matchExpressions"])

    # the namespace's deny-all and the server's own policy, nothing that opens more
    assert {name for name, spec in pols.items() if selects_pg(spec)} == {"default-deny", PG}
    pg = pols[PG]
    assert set(pg["policyTypes"]) == {"Ingress", "Egress"} and pg["egress"] == []
    (rule,) = pg["ingress"]
    assert [p["port"] for p in rule["ports"]] == [5432]
    hub_only = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "edge-hub"}}}
    assert rule["from"] == [hub_only]
    # the hub may dial it; nobody else has an egress rule that names it or its port
    for name, spec in pols.items():
        for r in spec.get("egress", []):
            to_pg = any(p.get("podSelector", {}).get("matchLabels", {}).get(
                "app.kubernetes.io/name") == PG for p in r.get("to", []))
            if to_pg or 5432 in {p["port"] for p in r.get("ports", [])}:
                assert name == "edge-hub-to-postgresql", name
                assert spec["podSelector"] == hub_only["podSelector"]
                assert to_pg and [p["port"] for p in r["ports"]] == [5432]


def test_the_migration_job_moves_the_base_hub_onto_the_ha_storage(
    rendered: dict[str, list[Obj]],
) -> None:
    (job,) = rendered["ha-migrate"]
    assert job["kind"] == "Job" and job["metadata"]["namespace"] == NAMESPACE
    assert job["spec"]["backoffLimit"] == 0
    spec = job["spec"]["template"]["spec"]
    assert spec["automountServiceAccountToken"] is False
    c = container(spec, "migrate")
    mounts = mounts_of(c, spec)
    claims = {v["persistentVolumeClaim"]["claimName"]: p for p, v in mounts.items()
              if "persistentVolumeClaim" in v}
    # from the base's claim (where the base hub's data_dir was) to the HA overlay's
    base_hub = find(rendered["base"], "Deployment", "edge-hub")["spec"]["template"]["spec"]
    base_data = next(p for p, v in mounts_of(container(base_hub, "hub"), base_hub).items()
                     if "persistentVolumeClaim" in v)
    assert set(claims) == {"edge-hub-data", "edge-hub-artifacts"}
    assert claims["edge-hub-data"] == base_data
    script = c["args"][0]
    assert f"cp -a {base_data}/artifacts {claims['edge-hub-artifacts']}/" in script
    assert f"exec edge-hub db migrate --from sqlite://{base_data} \\" in script
    assert '--to "$EDGE_HUB_STORAGE__DATABASE_URL"' in script
    # the same database and password as the hubs it prepares
    ha_hub = container(find(rendered["ha"], "Deployment", "edge-hub")["spec"]["template"]["spec"],
                       "hub")
    assert env_of(c) == env_of(ha_hub)
    # the pod is the hub's for the network policies (DNS, PostgreSQL)
    assert job["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] == "edge-hub"


def test_the_documented_migration_selector_applies_storage_and_no_hub(
    rendered: dict[str, list[Obj]],
) -> None:
    text = (ROOT / "docs" / "deploy.md").read_text()
    assert f"kubectl apply -k k3s/overlays/ha -l '{MIGRATION_SELECTOR}'" in text
    key, values = re.fullmatch(r"(\S+) in \((.*)\)", MIGRATION_SELECTOR).groups()  # type: ignore[union-attr]
    picked = {(o["kind"], o["metadata"]["name"].rsplit("-", 1)[0] if o["kind"] == "ConfigMap"
               else o["metadata"]["name"]) for o in rendered["ha"]
              if o["metadata"].get("labels", {}).get(key) in values.split(",")}
    assert picked == {
        ("StatefulSet", PG), ("Service", PG), ("ConfigMap", f"{PG}-config"),
        ("NetworkPolicy", PG), ("NetworkPolicy", "edge-hub-to-postgresql"),
        ("PersistentVolumeClaim", "edge-hub-artifacts"),
    }


def test_the_tracking_overlay_runs_the_agent_with_tracking(rendered: dict[str, list[Obj]]) -> None:
    """Cameras that publish events need norfair: the overlay swaps only the agent's image."""
    _, _, agent = agent_objects(rendered["tracking"])
    assert agent["image"].startswith("edge-agent-tracking:")
    _, _, plain = agent_objects(rendered["base"])
    assert plain["image"].startswith("edge-agent:")
    hub = [c for o, s in workloads(rendered["tracking"]) if o["metadata"]["name"] == "edge-hub"
           for c in s["containers"]]
    assert hub and all(c["image"].startswith("edge-hub:") for c in hub)
