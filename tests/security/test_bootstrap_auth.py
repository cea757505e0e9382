"""The bootstrap's credential and the hub's API credentials never stand in for each other.

An agent pod has no API token and, before its first certificate, no certificate either: the
bootstrap must answer it on a hub where every read needs a token (the K3s manifests' hub). And
the pod's ServiceAccount token, which every agent pod holds, must open nothing but the
bootstrap: used as a bearer token anywhere else on the hub it is an unknown token (401). The
other way round, the hub's own tokens and an agent's certificate get no certificate from the
bootstrap.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from hub.config import TokenSettings
from hub.pki import ca
from tests.support.bootstrap import API_TOKEN, NS, csr_for, hub_settings
from tests.support.broker import Broker
from tests.support.fake_k8s import FakeKube
from tests.support.hub_client import (
    READ_TOKEN,
    InProcessHub,
    default_pki,
    hub_session,
    running_hub,
    write_secret,
)

BOOTSTRAP = "/v1/pki/bootstrap"
#: What anyone may call: liveness, readiness and the API's description.
OPEN = {("get", "/healthz"), ("get", "/readyz"), ("get", "/v1/openapi.json"),
        # the fleet page's static files: public, no data (tests/security/test_http_auth.py)
        ("get", "/"), ("get", "/ui/{name}")}
_PARAMS = {"name": "tiny", "version": "1", "id": "1", "node": "node-x", "command": "pause"}


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    k = FakeKube().start()
    k.add_node("node-x", {"edge.ai/camera-node": "true"})
    yield k
    k.stop()


@pytest.fixture
async def hub(tmp_path: Path, kube: FakeKube, broker: Broker) -> AsyncIterator[InProcessHub]:
    """The K3s hub: reads need a token, an admin and a read token, client certificates asked
    for, bootstrap on."""
    settings = hub_settings(tmp_path, kube, broker)
    read = TokenSettings(file=write_secret(tmp_path / "read-token", READ_TOKEN), scope="read",
                         name="prometheus")
    api = settings.api.model_copy(update={"read_requires_token": True, "tokens": [read]})
    settings = settings.model_copy(update={"api": api})
    assert settings.api.read_requires_token and settings.api_tokens()
    async with running_hub(settings) as h:
        yield h


async def _bootstrap(http: aiohttp.ClientSession, hub: InProcessHub, token: str | None,
                     csr: str, node: str = "node-x") -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with http.post(hub.url + BOOTSTRAP, json={"node": node, "csr": csr},
                         headers=headers) as r:
        return r.status, await r.json()


async def _operations(hub: InProcessHub) -> list[tuple[str, str]]:
    """(method, concrete path) of every documented operation but the open ones and the
    bootstrap."""
    async with hub_session() as http, http.get(hub.url + "/v1/openapi.json") as r:
        doc = await r.json()
    ops = [(m, re.sub(r"\{(\w+)\}", lambda g: _PARAMS[g[1]], path))
           for path, item in doc["paths"].items() for m in item
           if m in ("get", "put", "post", "delete") and (m, path) not in OPEN
           and path != BOOTSTRAP]
    assert len(ops) >= 13, ops  # 6 registry, 6 fleet, /metrics
    return ops


async def test_a_pod_token_gets_a_certificate_where_reads_need_a_token(
        hub: InProcessHub, kube: FakeKube) -> None:
    kube.identity.add_pod(NS, "edge-agent-x", node="node-x")
    token = kube.identity.issue_token(NS, "edge-agent-x")
    async with hub_session() as anonymous:  # no API token, no certificate
        async with anonymous.get(hub.url + "/v1/models") as r:
            assert r.status == 401  # reads really need a token here
        status, body = await _bootstrap(anonymous, hub, token,
                                        csr_for(ec.generate_private_key(ec.SECP256R1())))
    assert status == 200, body
    assert ca.identity(body["certificate"].encode()) == ("node-x", "agent")


async def test_the_pod_token_opens_nothing_else(hub: InProcessHub, kube: FakeKube) -> None:
    kube.identity.add_pod(NS, "edge-agent-x", node="node-x")
    token = kube.identity.issue_token(NS, "edge-agent-x")
    ops = await _operations(hub)
    async with hub_session(headers={"Authorization": f"Bearer {token}"}) as pod:
        for method, path in ops:
            body = {"json": {}} if method in ("post", "put") else {}
            async with pod.request(method.upper(), hub.url + path, **body) as r:
                answer = await r.json()
                assert r.status == 401, (method, path, r.status, answer)
                assert answer["error"]["code"] == "unauthorized", (method, path)
        # and it still is what the bootstrap takes: the 401s above were about the API only
        status, _ = await _bootstrap(pod, hub, token,
                                     csr_for(ec.generate_private_key(ec.SECP256R1())))
        assert status == 200


async def test_api_credentials_get_no_certificate(hub: InProcessHub, kube: FakeKube) -> None:
    csr = csr_for(ec.generate_private_key(ec.SECP256R1()))
    async with hub_session() as http:
        for api_token in (API_TOKEN, READ_TOKEN):
            status, body = await _bootstrap(http, hub, api_token, csr)
            assert status == 403 and body["error"]["code"] == "bootstrap_refused", body
    # an agent's certificate without a pod token: who it is on the API does not matter here
    async with hub_session(default_pki().identity("node-x", "agent")) as agent:
        status, body = await _bootstrap(agent, hub, None, csr)
        assert status == 401 and body["error"]["code"] == "unauthorized", body
    assert kube.identity.reviews == [(("edge-hub",), False), (("edge-hub",), False)]
