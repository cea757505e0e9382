"""Set-up for the certificate bootstrap tests: a hub that signs for agent pods, the fake
Kubernetes API it asks, and a pod with its projected token file on the agent's side."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hub.config import HubSettings
from hub.pki import ca
from tests.support.broker import HUB, Broker
from tests.support.fake_k8s import FakeKube
from tests.support.hub_client import default_pki, tls_api
from tests.support.postgres import storage_for

NS = "edge-ai"
API_TOKEN = "api-t0ken"


def signing_ca() -> ca.CertificateAuthority:
    """The CA the test hubs serve HTTPS with and sign bootstrapped certificates with."""
    return default_pki().authority


def csr_for(key: ec.EllipticCurvePrivateKey, cn: str = "node-x") -> str:
    """A PEM CSR for ``key`` asking for ``cn`` (which the hub ignores)."""
    req = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
           .sign(key, hashes.SHA256()))
    return req.public_bytes(serialization.Encoding.PEM).decode()


def hub_settings(tmp: Path, kube: FakeKube | None, broker: Broker, *, ca_dir: Path | None = None,
                 enabled: bool = True, **bootstrap: Any) -> HubSettings:
    """A hub on HTTPS (the test hubs' CA, ``hub_client.default_pki``) that signs with that CA
    (or the one in ``ca_dir``), asking ``kube`` (None: a static site) about pods in ``NS``;
    certificates live 1 h unless ``cert_ttl_s`` says otherwise."""
    cluster: dict[str, Any] = {"backend": "static"}
    if kube is not None:
        cluster = {"backend": "kubernetes", "kubeconfig": kube.write_kubeconfig(tmp / "kcfg"),
                   "api_timeout_s": 2, "api_retries": 0, "api_backoff_s": 0.01,
                   "camera_nodes_only": False}
    return HubSettings(
        storage=storage_for(tmp / "hub-data"),
        api={"token": API_TOKEN, "host": "127.0.0.1", "port": 0, **tls_api()},
        mqtt={**broker.settings(HUB), "topic_prefix": "boot"},
        cluster=cluster,
        pki={"dir": ca_dir or signing_ca().folder,
             "bootstrap": {"enabled": enabled, "namespace": NS, "cert_ttl_s": 3600,
                           **bootstrap}},
    )


@dataclass
class Pod:
    """An agent pod as the fake API server knows it, with its token file as mounted."""

    name: str
    node: str
    token_file: Path

    def refresh(self, kube: FakeKube, **token: Any) -> None:
        """The kubelet rotating the projected token (``token``: ``issue_token`` options)."""
        self.token_file.write_text(kube.identity.issue_token(NS, self.name, **token))
        self.token_file.chmod(0o600)


def agent_pod(kube: FakeKube, folder: Path, node: str, name: str | None = None) -> Pod:
    """A running agent pod on ``node`` and its projected token in ``folder/token``."""
    name = name or f"edge-agent-{node}"
    kube.identity.add_pod(NS, name, node=node)
    folder.mkdir(parents=True, exist_ok=True)
    pod = Pod(name, node, folder / "token")
    pod.refresh(kube)
    return pod
