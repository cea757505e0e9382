"""The K3s manifests' security: the broker takes TLS with client certificates and the ACL the
contract renders, NetworkPolicies let each part reach only what it needs (agents: the broker,
the hub and the cameras; the hub: the broker and the API server; the broker: nothing), and the
hub serves HTTPS that agents reach with the fleet CA and their bootstrapped certificate, with
no token on any box. The broker config itself runs for real in ``test_k3s_mosquitto.py``; the
hub's HTTPS runs for real here, with a certificate issued as docs/deploy.md says."""

from __future__ import annotations

import os
import re
import shlex
import ssl
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest

from edge_agent import config as agent_config
from edge_agent.contract import acl
from hub import config as hub_config
from tests.support.hub_client import hub_settings, running_hub
from tests.support.pki import TestPki
from tests.system.test_k3s import (
    K3S,
    NAMESPACE,
    ROOT,
    Obj,
    container,
    find,
    generated,
    mounts_of,
    render,
    workloads,
)
from tests.system.test_k3s_config import configmap_files, secret_files


@pytest.fixture(scope="module")
def base() -> list[Obj]:
    return render(K3S)


def test_mosquitto_takes_tls_with_client_certificates_and_the_rendered_acl(
    base: list[Obj],
) -> None:
    cm = generated(base, "ConfigMap", "mosquitto-config")
    lines = [line.split(None, 1) for line in cm["data"]["mosquitto.conf"].splitlines()
             if line.strip() and not line.startswith("#")]
    conf = dict(lines)
    # one listener, TLS, on 8883: no plain port unless an overlay adds one
    assert [v for k, v in lines if k == "listener"] == ["8883 0.0.0.0"]
    assert conf["require_certificate"] == "true"
    assert conf["use_identity_as_username"] == "true"
    assert conf["use_username_as_clientid"] == "true"
    assert conf["allow_anonymous"] == "false"
    assert "password_file" not in conf
    assert conf["persistence"] == "true"
    assert conf["acl_file"] == "/mosquitto/config/acl"
    # the committed ACL is what the contract renders (re-render: acl.site_acl's docstring)
    assert cm["data"]["acl"] == acl.site_acl()
    assert (K3S / "base" / "mosquitto" / "acl").read_text() == acl.site_acl()
    dep = find(base, "Deployment", "mosquitto")
    spec = dep["spec"]["template"]["spec"]
    mounts = mounts_of(container(spec, "mosquitto"), spec)
    assert mounts["/mosquitto/data"]["persistentVolumeClaim"]["claimName"] == "mosquitto-data"
    tls = mounts["/mosquitto/tls"]["secret"]
    assert tls["secretName"] == "mosquitto-tls"
    assert {f"/mosquitto/tls/{i['path']}" for i in tls["items"]} == {
        conf["cafile"], conf["certfile"], conf["keyfile"]}
    assert dep["spec"]["strategy"]["type"] == "Recreate"
    svc = find(base, "Service", "mosquitto")["spec"]["ports"]
    assert [(p["port"], p["targetPort"]) for p in svc] == [(8883, "mqtts")]


def _egress_peers(policy: Obj) -> list[tuple[str, frozenset[int]]]:
    """Each egress rule as (who, ports): a pod's app name, ``dns``, ``ip:<cidr>`` or ``any``."""
    out: list[tuple[str, frozenset[int]]] = []
    for rule in policy["spec"].get("egress", []):
        ports = frozenset(p["port"] for p in rule.get("ports", []))
        for peer in rule.get("to", [{}]):
            if "ipBlock" in peer:
                who = "ip:" + peer["ipBlock"]["cidr"]
            elif "namespaceSelector" in peer:
                who = "dns"
            elif "podSelector" in peer:
                who = peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
            else:
                who = "any"
            out.append((who, ports))
    return out


def test_network_policies_let_each_part_reach_only_what_it_needs(base: list[Obj]) -> None:
    pols = {o["metadata"]["name"]: o for o in base if o["kind"] == "NetworkPolicy"}
    deny = pols["default-deny"]["spec"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny and "egress" not in deny
    hub_port = find(base, "Service", "edge-hub")["spec"]["ports"][0]["port"]
    broker_port = find(base, "Service", "mosquitto")["spec"]["ports"][0]["port"]
    agent = dict(_egress_peers(pols["edge-agent"]))
    # inside the cluster the agent reaches the broker and the hub, nothing else
    assert agent.pop("mosquitto") == {broker_port}
    assert agent.pop("edge-hub") == {hub_port}
    # the rest are the cameras: private addresses, never the cluster's own networks
    assert set(agent) == {"ip:10.0.0.0/8", "ip:172.16.0.0/12", "ip:192.168.0.0/16"}
    ten = next(p for r in pols["edge-agent"]["spec"]["egress"] for p in r.get("to", [])
               if p.get("ipBlock", {}).get("cidr") == "10.0.0.0/8")
    assert {"10.42.0.0/16", "10.43.0.0/16"} <= set(ten["ipBlock"]["except"])
    hub = _egress_peers(pols["edge-hub"])
    assert ("mosquitto", frozenset({broker_port})) in hub
    assert [who for who, _ in hub] == ["mosquitto", "any"]  # + the API server's ports
    assert dict(hub)["any"] == {443, 6443}
    assert pols["mosquitto"]["spec"]["egress"] == []
    assert [r["ports"][0]["port"] for r in pols["mosquitto"]["spec"]["ingress"]] == [broker_port]
    dns = pols["dns"]["spec"]
    assert dns["policyTypes"] == ["Egress"]
    assert {p["port"] for r in dns["egress"] for p in r["ports"]} == {53}
    # every pod label a policy names exists, so no rule silently selects nothing
    apps = {o["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]
            if o["kind"] != "CronJob" else "edge-batch" for o, _ in workloads(base)}
    for name in ("edge-agent", "edge-hub", "mosquitto"):
        assert pols[name]["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"] in apps


# ----------------------------------------------------------------------------- the hub's HTTPS


def _pod(base: list[Obj], kind: str, name: str, cname: str) -> tuple[Obj, Obj, dict[str, Obj]]:
    """(pod template, container, mounts by path) of a workload."""
    template = find(base, kind, name)["spec"]["template"]
    c = container(template["spec"], cname)
    return template, c, mounts_of(c, template["spec"])


def _config_text(base: list[Obj], c: Obj, mounts: dict[str, Obj]) -> str:
    path = Path(c["args"][c["args"].index("--config") + 1])
    cm = find(base, "ConfigMap", mounts[str(path.parent)]["configMap"]["name"])
    return str(cm["data"][path.name])


@pytest.fixture
def configs(base: list[Obj], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
            ) -> tuple[agent_config.AgentSettings, hub_config.HubSettings]:
    """The agent's and the hub's settings as their pods load them."""
    for k in list(os.environ):
        if k.startswith(("EDGE_AGENT_", "EDGE_HUB_")):
            monkeypatch.delenv(k)
    monkeypatch.setenv("NODE_NAME", "box-1")
    _, ac, am = _pod(base, "DaemonSet", "edge-agent", "agent")
    (tmp_path / "agent.yaml").write_text(_config_text(base, ac, am))
    _, hc, hm = _pod(base, "Deployment", "edge-hub", "hub")
    (tmp_path / "hub.yaml").write_text(_config_text(base, hc, hm))
    return (agent_config.load_settings(tmp_path / "agent.yaml"),
            hub_config.load_settings(tmp_path / "hub.yaml"))


def _origin(url: str) -> tuple[str, str | None, int | None]:
    parts = urlsplit(url)
    return parts.scheme, parts.hostname, parts.port


def test_the_hub_serves_https_with_scoped_tokens_and_asks_agents_for_certificates(
    base: list[Obj], configs: tuple[agent_config.AgentSettings, hub_config.HubSettings],
) -> None:
    _, hub = configs
    template, c, mounts = _pod(base, "Deployment", "edge-hub", "hub")
    api = hub.api
    assert not api.plain_http and api.read_requires_token
    # the server certificate and key from their own Secret, readable by the pod's group only
    tls = mounts[str(Path(str(api.tls_cert_file)).parent)]["secret"]
    assert tls["secretName"] == "edge-hub-tls" and tls["defaultMode"] & 0o007 == 0
    assert {str(api.tls_cert_file), str(api.tls_key_file)} <= secret_files(mounts)
    # client certificates verified against the fleet CA bundle the agents trust too
    assert str(api.client_ca_file) in configmap_files(mounts)
    assert mounts[str(Path(str(api.client_ca_file)).parent)]["configMap"]["name"] == "edge-ca"
    # one admin and one read token, each from the credentials Secret, none written inline
    assert api.token is None and api.token_file is None
    assert sorted(t.scope for t in api.tokens) == ["admin", "read"]
    creds = {f"/etc/edge-hub/secrets/{i['path']}": i["key"]
             for i in mounts["/etc/edge-hub/secrets"]["secret"]["items"]}
    assert mounts["/etc/edge-hub/secrets"]["secret"]["secretName"] == "edge-hub-credentials"
    assert {str(t.file) for t in api.tokens} == set(creds)
    # artifact URLs on the Service's HTTPS name
    svc = find(base, "Service", "edge-hub")["spec"]["ports"][0]
    assert _origin(hub.public_url()) == (
        "https", f"edge-hub.{NAMESPACE}.svc.cluster.local", svc["port"])
    (port,) = c["ports"]
    assert port["containerPort"] == api.port and svc["targetPort"] == port["name"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["scheme"] == "HTTPS", probe
        assert c[probe]["httpGet"]["port"] == port["name"]
    notes = template["metadata"]["annotations"]
    assert notes["prometheus.io/scheme"] == "https"
    assert notes["prometheus.io/port"] == str(api.port)
    assert notes["prometheus.io/path"] == "/metrics"


def test_agents_use_the_hubs_origin_the_fleet_ca_and_their_certificate_and_no_token(
    base: list[Obj], configs: tuple[agent_config.AgentSettings, hub_config.HubSettings],
) -> None:
    agent, hub = configs
    template, _, mounts = _pod(base, "DaemonSet", "edge-agent", "agent")
    h = agent.hub
    assert h.url is not None
    # the agent fetches only from its hub's origin: the hub's artifact URLs must be on it
    assert _origin(h.url) == _origin(hub.public_url())
    # the hub verified against the fleet CA (the same ConfigMap as for the broker)
    assert h.ca_file == agent.mqtt.ca_file and str(h.ca_file) in configmap_files(mounts)
    # downloads with the node's certificate, the very files the bootstrap writes and renews
    assert agent.identity.bootstrap
    assert (h.cert_file, h.key_file) == (agent.mqtt.cert_file, agent.mqtt.key_file)
    # no token and no Secret on a box: the only credential is the node's own
    assert h.token_file is None and agent.http.token_file is None
    assert not [v for v in template["spec"]["volumes"] if "secret" in v]


def _documented_hub_names() -> list[str]:
    """The ``--dns`` names docs/deploy.md's step 4 issues the hub's HTTPS certificate for."""
    text = (ROOT / "docs" / "deploy.md").read_text().replace("\\\n", " ")
    (line,) = [ln for ln in text.splitlines()
               if ln.startswith("edge-hub pki issue edge-hub --role server")]
    args = shlex.split(line, comments=True)
    names = [args[i + 1] for i, a in enumerate(args) if a == "--dns"]
    out = args[args.index("--out") + 1]
    assert re.search(rf"create secret generic edge-hub-tls --from-file={re.escape(out)}\b", text)
    return names


def test_docs_create_every_secret_key_the_hub_mounts(base: list[Obj]) -> None:
    text = (ROOT / "docs" / "deploy.md").read_text()
    _, _, mounts = _pod(base, "Deployment", "edge-hub", "hub")
    keys = {i["key"] for i in mounts["/etc/edge-hub/secrets"]["secret"]["items"]}
    for key in keys:
        assert f"--from-literal={key}=" in text, key
    assert f"edge-hub.{NAMESPACE}.svc.cluster.local" in _documented_hub_names()


async def test_an_agent_reaches_the_hub_by_its_service_name_with_its_certificate(
    base: list[Obj], configs: tuple[agent_config.AgentSettings, hub_config.HubSettings],
    tmp_path: Path,
) -> None:
    """A certificate issued with the documented names, served by the hub's own TLS listener:
    an agent that dials ``hub.url``'s host verifies it and downloads with its certificate."""
    agent, _ = configs
    pki = TestPki(tmp_path / "pki")
    server = pki.identity("edge-hub", "server", dns_names=tuple(_documented_hub_names()))
    node = pki.identity(agent.node, "agent")
    settings = hub_settings(tmp_path / "data", tls_cert_file=str(server.cert_file),
                            tls_key_file=str(server.key_file), client_ca_file=str(pki.ca_file))
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    ctx.load_cert_chain(node.cert_file, node.key_file)
    assert agent.hub.url is not None
    host = urlsplit(agent.hub.url).hostname
    async with running_hub(settings) as h, aiohttp.ClientSession() as http:
        base_url = h.url  # https://127.0.0.1:PORT; the agent dials the Service's name
        assert urlsplit(base_url).hostname == "127.0.0.1"
        async with http.get(base_url + "/v1/models", ssl=ctx, server_hostname=host) as r:
            assert r.status == 200, await r.text()  # the agent's scope: list and download
        async with http.get(base_url + "/v1/nodes", ssl=ctx, server_hostname=host) as r:
            assert r.status == 403  # and nothing else
        # a name the certificate does not carry is refused by the agent's check
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await http.get(base_url + "/healthz", ssl=ctx,
                           server_hostname="edge-hub.other.svc.cluster.local")
