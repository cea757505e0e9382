"""The K3s certificate bootstrap under attack: only a live agent pod gets a certificate, and
only for the node it runs on.

A real hub (in this process, real aiohttp on a loopback port, its real Kubernetes backend)
asks the fake Kubernetes API (``tests/support/fake_k8s_auth.py``: TokenReview and pods, answered
as a real API server answers) about every request. Each refusal must be a 403 (or the status
named), sign nothing, be counted on ``/metrics`` by reason and logged without the token. The
agent's side, and a renewal over a real TLS broker, are in ``test_bootstrap_renewal.py``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from prometheus_client import generate_latest

from hub.api import fleet as api_fleet
from hub.config import ConfigError, HubSettings
from hub.pki import ca
from hub.server.app import build_app
from tests.support.bootstrap import NS, csr_for, hub_settings, signing_ca
from tests.support.broker import Broker
from tests.support.fake_k8s import FakeKube
from tests.support.hub_client import InProcessHub, hub_session, running_hub
from tests.support.waiting import until

TTL_S = 3600


def settings_for(tmp: Path, kube: FakeKube | None, broker: Broker, **kw: Any) -> HubSettings:
    return hub_settings(tmp, kube, broker, **kw)


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    k = FakeKube().start()
    for n in ("node-x", "node-y"):
        k.add_node(n, {"edge.ai/camera-node": "true"})
    yield k
    k.stop()


@pytest.fixture
def authority() -> ca.CertificateAuthority:
    return signing_ca()


@pytest.fixture
async def hub(tmp_path: Path, kube: FakeKube, broker: Broker,
              authority: ca.CertificateAuthority) -> AsyncIterator[InProcessHub]:
    async with running_hub(settings_for(tmp_path, kube, broker)) as h:
        yield h


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with hub_session() as s:
        yield s


async def bootstrap(http: aiohttp.ClientSession, hub: InProcessHub, token: str | None,
                    body: Any) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with http.post(f"{hub.url}/v1/pki/bootstrap", json=body, headers=headers) as r:
        assert r.content_type == "application/json"
        return r.status, await r.json()


async def metrics(http: aiohttp.ClientSession, hub: InProcessHub) -> str:
    """What ``/metrics`` exposes: the hub's registry, rendered as a scrape renders it."""
    return generate_latest(hub.app[api_fleet.METRICS_KEY]).decode()


def issued_count(text: str) -> float:
    line = next(ln for ln in text.splitlines()
                if ln.startswith("edge_hub_pki_bootstrap_issued_total"))
    return float(line.split()[-1])


async def test_a_pod_on_node_x_gets_a_short_lived_agent_certificate_for_x_only(
        hub: InProcessHub, kube: FakeKube, http: aiohttp.ClientSession,
        authority: ca.CertificateAuthority) -> None:
    kube.identity.add_pod(NS, "edge-agent-abcde", node="node-x")
    token = kube.identity.issue_token(NS, "edge-agent-abcde")
    key = ec.generate_private_key(ec.SECP256R1())
    # the CSR asks for another name: the hub decides the name, from the API server's answer
    status, body = await bootstrap(http, hub, token, {"node": "node-x",
                                                      "csr": csr_for(key, cn="node-y")})
    assert status == 200, body
    cert = x509.load_pem_x509_certificate(body["certificate"].encode())
    cert.verify_directly_issued_by(authority.cert)
    assert ca.identity(body["certificate"].encode()) == ("node-x", "agent")
    assert cert.public_key() == key.public_key()
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    life = cert.not_valid_after_utc - dt.datetime.now(dt.timezone.utc)
    assert dt.timedelta(seconds=TTL_S - 60) < life <= dt.timedelta(seconds=TTL_S)
    assert body["ca"].encode() == authority.cert_pem
    assert body["node"] == "node-x" and body["role"] == "agent"
    assert body["serial"] == f"{cert.serial_number:x}"
    # the hub asked for exactly its audience
    assert kube.identity.reviews == [(("edge-hub",), True)]
    assert issued_count(await metrics(http, hub)) == 1


def _attacks(kube: FakeKube) -> list[tuple[str, str, str, str]]:
    """(what, token, node claimed, refusal reason) for each attack."""
    ident = kube.identity
    ident.add_pod(NS, "agent-x", node="node-x")
    ident.add_pod(NS, "agent-y", node="node-y")
    ident.add_pod(NS, "other-x", node="node-x", service_account="metrics-exporter")
    ident.add_pod("default", "intruder-x", node="node-x", service_account="edge-agent")
    ident.add_pod(NS, "agent-gone", node="node-x")
    ident.add_pod(NS, "agent-z", node="node-y")
    gone = ident.issue_token(NS, "agent-gone")
    replaced = ident.issue_token(NS, "agent-z")
    out = [
        ("a token for the API server's audience",
         ident.issue_token(NS, "agent-x", audiences=("https://kubernetes.default.svc",
                                                     "k3s")), "node-x", "token_rejected"),
        ("a token for another audience",
         ident.issue_token(NS, "agent-x", audiences=("vault",)), "node-x", "token_rejected"),
        ("an expired token", ident.issue_token(NS, "agent-x", expires_in=-1), "node-x",
         "token_rejected"),
        ("a pod on node-y asking for node-x", ident.issue_token(NS, "agent-y"), "node-x",
         "wrong_node"),
        ("a token that names node-y asking for node-x",
         ident.issue_token(NS, "agent-y", node_info=True), "node-x", "wrong_node"),
        ("a pod under another ServiceAccount", ident.issue_token(NS, "other-x"), "node-x",
         "wrong_service_account"),
        ("the agents' ServiceAccount name in another namespace",
         ident.issue_token("default", "intruder-x"), "node-x", "wrong_service_account"),
        ("not a token at all", "eyJhbGciOiJSUzI1NiJ9.e30.c2ln", "node-x", "token_rejected"),
    ]
    ident.add_pod(NS, "agent-z", node="node-y")  # the pod was replaced: a new uid
    ident.delete_pod(NS, "agent-gone")
    out += [("the token of a deleted pod", gone, "node-x", "token_rejected"),
            ("the token of a pod since replaced", replaced, "node-y", "token_rejected")]
    return out


async def test_every_attack_is_refused_counted_and_logged_without_the_token(
        hub: InProcessHub, kube: FakeKube, http: aiohttp.ClientSession) -> None:
    attacks = _attacks(kube)
    csr = csr_for(ec.generate_private_key(ec.SECP256R1()))
    with structlog.testing.capture_logs() as logs:
        for what, token, node, reason in attacks:
            status, body = await bootstrap(http, hub, token, {"node": node, "csr": csr})
            assert status == 403, (what, body)
            assert body["error"]["code"] == "bootstrap_refused", what
            assert "certificate" not in body, what
            refusals = [e for e in logs if e["event"] == "pki_bootstrap_refused"]
            assert refusals and refusals[-1]["reason"] == reason, (what, refusals[-1:])
    text = await metrics(http, hub)
    assert issued_count(text) == 0
    for reason in {r for *_, r in attacks}:
        n = sum(1 for *_, r in attacks if r == reason)
        assert f'edge_hub_pki_bootstrap_refused_total{{reason="{reason}"}} {n}.0' in text
    dump = repr(logs)
    for _, token, _, _ in attacks:
        assert token not in dump


async def test_a_pod_outside_the_api_server_view_is_refused(
        hub: InProcessHub, kube: FakeKube, http: aiohttp.ClientSession) -> None:
    """The API server still accepts the token (it was just minted) but the pod it names has
    ended: no certificate for a pod that no longer runs."""
    kube.identity.add_pod(NS, "agent-x", node="node-x", phase="Succeeded")
    token = kube.identity.issue_token(NS, "agent-x")
    status, body = await bootstrap(http, hub, token, {
        "node": "node-x", "csr": csr_for(ec.generate_private_key(ec.SECP256R1()))})
    assert status == 403 and "ended" in body["error"]["message"]


@pytest.mark.parametrize(("body", "status", "code"), [
    ({"node": "node-x"}, 400, "invalid_request"),
    ({"node": "node-x", "csr": "x", "role": "hub"}, 400, "invalid_request"),
    ({"node": "Node_X", "csr": "x"}, 400, "invalid_request"),
    ({"node": "n" * 65, "csr": "x"}, 400, "invalid_request"),
    ({"node": "node-x", "csr": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n"}, 400,
     "invalid_request"),
    ({"node": "node-x", "csr": "x" * 20_000}, 413, "too_large"),
    ([1, 2], 400, "invalid_request"),
])
async def test_bad_bodies_are_json_errors_before_the_api_server_is_asked(
        hub: InProcessHub, kube: FakeKube, http: aiohttp.ClientSession, body: Any, status: int,
        code: str) -> None:
    kube.identity.add_pod(NS, "agent-x", node="node-x")
    token = kube.identity.issue_token(NS, "agent-x")
    got, out = await bootstrap(http, hub, token, body)
    assert (got, out["error"]["code"]) == (status, code)
    assert kube.identity.reviews == []


async def test_a_body_without_a_length_is_cut_off_at_the_limit(
        hub: InProcessHub, kube: FakeKube, http: aiohttp.ClientSession) -> None:
    async def chunks() -> AsyncIterator[bytes]:  # chunked: no Content-Length to refuse by
        for _ in range(64):
            yield b" " * 4096

    with structlog.testing.capture_logs() as logs:
        async with http.post(f"{hub.url}/v1/pki/bootstrap", data=chunks(),
                             headers={"Authorization": "Bearer x"}) as r:
            assert r.status == 413 and (await r.json())["error"]["code"] == "too_large"
            assert r.headers["Connection"] == "close"
    refused = [e for e in logs if e["event"] == "pki_bootstrap_refused"]
    assert [e["reason"] for e in refused] == ["too_large"]
    assert kube.identity.reviews == []


async def test_no_token_is_401_and_not_json_is_400(
        hub: InProcessHub, http: aiohttp.ClientSession) -> None:
    csr = csr_for(ec.generate_private_key(ec.SECP256R1()))
    status, body = await bootstrap(http, hub, None, {"node": "node-x", "csr": csr})
    assert status == 401 and body["error"]["code"] == "unauthorized"
    async with http.post(f"{hub.url}/v1/pki/bootstrap", data=b"{nope",
                         headers={"Authorization": "Bearer x"}) as r:
        assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_request"


async def test_the_slot_is_taken_before_the_api_server_is_asked(
        tmp_path: Path, kube: FakeKube, broker: Broker, http: aiohttp.ClientSession,
        authority: ca.CertificateAuthority) -> None:
    kube.identity.add_pod(NS, "agent-x", node="node-x")
    token = kube.identity.issue_token(NS, "agent-x")
    csr = csr_for(ec.generate_private_key(ec.SECP256R1()))
    kube.identity.hold = threading.Event()
    async with running_hub(settings_for(tmp_path, kube, broker, concurrency=1)) as hub:
        first = asyncio.ensure_future(bootstrap(http, hub, token, {"node": "node-x",
                                                                   "csr": csr}))
        await until(lambda: kube.identity.held == 1, what="the first one with the API server")
        status, body = await bootstrap(http, hub, token, {"node": "node-x", "csr": csr})
        assert status == 429 and body["error"]["code"] == "busy"
        kube.identity.hold.set()
        assert (await first)[0] == 200
        assert kube.count("POST") == 1


async def test_an_api_server_that_fails_is_503_and_signs_nothing(
        hub: InProcessHub, kube: FakeKube, http: aiohttp.ClientSession) -> None:
    kube.identity.add_pod(NS, "agent-x", node="node-x")
    token = kube.identity.issue_token(NS, "agent-x")
    kube.inject("GET", 500, node="agent-x")
    status, body = await bootstrap(http, hub, token, {
        "node": "node-x", "csr": csr_for(ec.generate_private_key(ec.SECP256R1()))})
    assert status == 503, body
    text = await metrics(http, hub)
    assert issued_count(text) == 0
    assert 'edge_hub_pki_bootstrap_refused_total{reason="cluster_error"} 1.0' in text


async def test_a_static_site_or_a_hub_with_bootstrap_off_refuses_clearly(
        tmp_path: Path, kube: FakeKube, broker: Broker, http: aiohttp.ClientSession,
        authority: ca.CertificateAuthority) -> None:
    kube.identity.add_pod(NS, "agent-x", node="node-x")
    token = kube.identity.issue_token(NS, "agent-x")
    body = {"node": "node-x", "csr": csr_for(ec.generate_private_key(ec.SECP256R1()))}
    async with running_hub(settings_for(tmp_path, None, broker, enabled=False)) as hub:
        status, out = await bootstrap(http, hub, token, body)
        assert status == 403 and "cluster.backend: kubernetes" in out["error"]["message"]
        assert "edge-hub pki issue" in out["error"]["message"]
    async with running_hub(settings_for(tmp_path, kube, broker, enabled=False)) as hub:
        status, out = await bootstrap(http, hub, token, body)
        assert status == 403 and "pki.bootstrap.enabled" in out["error"]["message"]
    assert kube.identity.reviews == []


def test_a_hub_that_cannot_keep_its_promise_does_not_start(tmp_path: Path,
                                                           broker: Broker) -> None:
    with pytest.raises(ConfigError) as exc:  # bootstrap on, but no Kubernetes to ask
        build_app(settings_for(tmp_path, None, broker))
    assert exc.value.errors[0][0] == "pki.bootstrap.enabled"
    kube = FakeKube()  # never started: only its kubeconfig is written
    with pytest.raises(ConfigError) as exc:  # bootstrap on, but no CA
        build_app(settings_for(tmp_path, kube, broker, ca_dir=tmp_path / "no-ca"))
    assert exc.value.errors[0][0] == "pki.dir" and "pki init" in exc.value.errors[0][1]
