"""Certificates for agent pods on K3s, signed only for the node a pod proves it runs on.

An agent pod cannot be handed a certificate in advance: DaemonSet pods come and go with their
nodes, and a fleet-wide credential is what the trust model forbids (DESIGN.md). What a pod
does have is a projected ServiceAccount token minted by the API server for the audience
``edge-hub`` and bound to the pod. So the agent sends that token with a CSR and the node name
it claims, and the hub believes the API server, never the requester:

1. a TokenReview (audience ``pki.bootstrap.audience``) says the token is valid, unexpired,
   for that audience, and belongs to ``system:serviceaccount:<namespace>:<service_account>``;
2. the review's extra info names the pod the token is bound to (``pod-name``, ``pod-uid``, as
   the API server puts them in every bound token; ``node-name`` too on newer servers);
3. that pod exists now with that uid, runs on the claimed node (``spec.nodeName``) under the
   agent's ServiceAccount, and has not ended;
4. then, and only then, the CA signs the CSR's key for exactly that node, role ``agent``,
   for ``pki.bootstrap.cert_ttl_s``. The CSR's own subject is ignored (``ca.sign_csr``).

A token stolen from node Y's pod therefore gets a certificate for Y at most, and only while
that pod lives. Every refusal is counted by reason (``Stats``, on ``/metrics``) and logged with
the node and pod, never the token.

The Kubernetes calls go through a ``PodDirectory`` (the Kubernetes cluster backend has both
methods); it answers with the objects' JSON as the API server sends them, and this module reads
them defensively: a missing or odd field refuses, it never raises anything but a refusal.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import structlog

from edge_agent.contract.protocol import is_valid_node
from hub.config import BootstrapSettings, ConfigError, HubSettings
from hub.errors import HubError, InvalidRequest, Unauthorized
from hub.pki import ca

log = structlog.get_logger(__name__)

POD_NAME_KEY = "authentication.kubernetes.io/pod-name"
POD_UID_KEY = "authentication.kubernetes.io/pod-uid"
NODE_NAME_KEY = "authentication.kubernetes.io/node-name"
#: Pod phases in which the agent container may be the one asking.
LIVE_PHASES = frozenset({"Pending", "Running"})
#: Longest node name a certificate can carry (X.509 limits a common name to 64 characters).
MAX_CN = 64


class BootstrapRefused(HubError, code="bootstrap_refused", http_status=403):
    """The hub will not sign: ``reason`` is the stable cause (a metric label)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class BootstrapBusy(HubError, code="busy", http_status=429):
    """Too many bootstraps are being checked at once; retry after a backoff."""


class CaUnavailable(HubError, code="ca_unavailable", http_status=503):
    """The CA cannot sign (it expires before the certificate would): rotate it."""


@runtime_checkable
class PodDirectory(Protocol):
    """What the bootstrap asks the cluster (``hub.cluster.kubernetes.KubernetesCluster``)."""

    async def review_token(self, token: str, audiences: Sequence[str]) -> Mapping[str, Any]:
        """The ``status`` of a TokenReview of ``token`` for ``audiences``."""
        ...

    async def get_pod(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        """The Pod object, or None when there is no such pod."""
        ...


@dataclass
class Stats:
    """Certificates issued and requests refused, by reason (one writer: the Bootstrapper)."""

    issued: int = 0
    refused: collections.Counter[str] = field(default_factory=collections.Counter)


@dataclass(frozen=True)
class Grant:
    """What a successful bootstrap returns to the agent."""

    node: str
    pod: str
    issued: ca.Issued
    ca_pem: bytes


def _one(extra: Mapping[str, Any], key: str) -> str | None:
    """The single string value of an extra-info key (a list of one, as the API sends it)."""
    value = extra.get(key)
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str) and value[0]:
        return value[0]
    return None


def _str(obj: Mapping[str, Any], *path: str) -> str:
    cur: Any = obj
    for key in path:
        cur = cur.get(key) if isinstance(cur, Mapping) else None
    return cur if isinstance(cur, str) else ""


class Bootstrapper:
    """Checks a bootstrap request against the API server and signs for the proven node."""

    def __init__(self, settings: BootstrapSettings, authority: ca.CertificateAuthority | None,
                 directory: PodDirectory | None) -> None:
        self.settings = settings
        self.authority = authority
        self.directory = directory
        self.stats = Stats()
        self._in_flight = 0
        self.username = (f"system:serviceaccount:{settings.namespace}:"
                         f"{settings.service_account}")

    @classmethod
    def from_settings(cls, settings: HubSettings, cluster: object) -> Bootstrapper:
        """The hub's bootstrapper: the CA loaded when bootstrap is on (ConfigError if it
        cannot be), the cluster as directory when it is a Kubernetes one."""
        directory = cluster if isinstance(cluster, PodDirectory) else None
        b = settings.pki.bootstrap
        if not b.enabled:
            return cls(b, None, directory)
        if directory is None:
            raise ConfigError([("pki.bootstrap.enabled", "certificate bootstrap needs "
                                "cluster.backend: kubernetes", True)])
        try:
            authority = ca.CertificateAuthority.load(settings.pki_dir())
        except ca.PkiError as exc:
            raise ConfigError([("pki.dir", str(exc), str(settings.pki_dir()))]) from exc
        return cls(b, authority, directory)

    # ------------------------------------------------------------------------------ refusals
    def refuse(self, reason: str, message: str, **context: Any) -> BootstrapRefused:
        """Count and log a refusal; the error to raise (403 unless the caller picks another)."""
        self.stats.refused[reason] += 1
        log.warning("pki_bootstrap_refused", reason=reason, detail=message, **context)
        return BootstrapRefused(reason, message)

    def count(self, reason: str, exc: HubError, **context: Any) -> HubError:
        """Count and log a refusal that is not a 403 (a bad body, no token, busy); ``exc``."""
        self.stats.refused[reason] += 1
        log.warning("pki_bootstrap_refused", reason=reason, detail=str(exc), **context)
        return exc

    # ------------------------------------------------------------------------------- the flow
    async def bootstrap(self, *, token: str | None, node: str, csr_pem: bytes) -> Grant:
        """Sign ``csr_pem`` for ``node`` when ``token`` proves a live agent pod on ``node``.

        Raises ``BootstrapRefused`` (403), ``Unauthorized`` (no token), ``InvalidRequest``
        (bad node name or CSR), ``BootstrapBusy`` (429); each counted. ``ClusterError`` (503)
        when the API server cannot be asked, counted as ``cluster_error``.
        """
        directory, authority = self.directory, self.authority
        shown = node[:MAX_CN]  # the claimed name, as far as a log line needs it
        if directory is None:
            raise self.refuse("no_kubernetes", "certificate bootstrap needs cluster.backend: "
                              "kubernetes; on a static site issue certificates with `edge-hub "
                              "pki issue`", node=shown)
        if authority is None:
            raise self.refuse("disabled", "certificate bootstrap is off on this hub "
                              "(pki.bootstrap.enabled)", node=shown)
        if not token:
            raise self.count("no_token", Unauthorized(
                "missing bearer token: send the pod's projected ServiceAccount token"), node=shown)
        if not is_valid_node(node) or len(node) > MAX_CN:
            raise self.count("bad_request", InvalidRequest(
                f"node must be a Kubernetes node name of at most {MAX_CN} characters"))
        try:
            csr = ca.load_csr(csr_pem)
        except ca.PkiError as exc:
            raise self.count("bad_request", InvalidRequest(str(exc)), node=shown) from exc
        if self._in_flight >= self.settings.concurrency:
            raise self.count("busy", BootstrapBusy(
                f"{self.settings.concurrency} bootstraps are being checked; retry"), node=shown)
        self._in_flight += 1
        try:
            pod = await self._prove(directory, token, node)
            issued = await asyncio.to_thread(authority.sign_request, csr, node, "agent",
                                             ttl_s=float(self.settings.cert_ttl_s))
        except ca.PkiError as exc:
            raise self.count("ca_error", CaUnavailable(str(exc)), node=shown) from exc
        except BootstrapRefused:
            raise
        except HubError as exc:  # the API server could not be asked (ClusterError, 503)
            self.count("cluster_error", exc, node=shown)
            raise
        finally:
            self._in_flight -= 1
        self.stats.issued += 1
        log.info("pki_bootstrap_issued", node=shown, pod=pod, serial=f"{issued.serial:x}",
                 not_after=issued.not_after.isoformat())
        return Grant(node, pod, issued, authority.cert_pem)

    async def _prove(self, directory: PodDirectory, token: str, node: str) -> str:
        """The name of the agent pod on ``node`` that ``token`` belongs to, or a refusal."""
        s = self.settings
        review = await directory.review_token(token, [s.audience])
        audiences = review.get("audiences")
        if review.get("authenticated") is not True:
            raise self.refuse("token_rejected", "the token was not accepted by the API server "
                              f"for audience {s.audience!r}", node=node)
        if not isinstance(audiences, list) or s.audience not in audiences:
            raise self.refuse("wrong_audience", f"the token is not for audience "
                              f"{s.audience!r}", node=node)
        user = review.get("user")
        user = user if isinstance(user, Mapping) else {}
        username = _str(user, "username")
        if username != self.username:
            raise self.refuse("wrong_service_account", f"the token belongs to {username!r}, "
                              f"not the agents' {self.username!r}", node=node)
        extra = user.get("extra")
        extra = extra if isinstance(extra, Mapping) else {}
        pod_name, pod_uid = _one(extra, POD_NAME_KEY), _one(extra, POD_UID_KEY)
        if pod_name is None or pod_uid is None:
            raise self.refuse("not_pod_bound", "the token is not bound to a pod (mount a "
                              "projected ServiceAccount token)", node=node)
        token_node = _one(extra, NODE_NAME_KEY)
        if token_node is not None and token_node != node:
            raise self.refuse("wrong_node", f"the token's pod runs on {token_node!r}, not "
                              f"{node!r}", node=node, pod=pod_name)
        pod = await directory.get_pod(s.namespace, pod_name)
        self._check_pod(pod, pod_name, pod_uid, node)
        return pod_name

    def _check_pod(self, pod: Mapping[str, Any] | None, name: str, uid: str, node: str) -> None:
        s = self.settings
        if pod is None:
            raise self.refuse("pod_missing", f"pod {s.namespace}/{name} does not exist",
                              node=node, pod=name)
        if _str(pod, "metadata", "uid") != uid:
            raise self.refuse("pod_replaced", f"pod {s.namespace}/{name} is not the pod the "
                              "token was issued to", node=node, pod=name)
        pod_node = _str(pod, "spec", "nodeName")
        if pod_node != node:
            raise self.refuse("wrong_node", f"the token's pod runs on {pod_node or 'no node'!r}"
                              f", not {node!r}", node=node, pod=name)
        pod_sa = _str(pod, "spec", "serviceAccountName")
        if pod_sa != s.service_account:
            raise self.refuse("wrong_service_account", f"pod {name} runs under ServiceAccount "
                              f"{pod_sa!r}, not {s.service_account!r}", node=node, pod=name)
        phase = _str(pod, "status", "phase") or "Pending"
        if phase not in LIVE_PHASES:
            raise self.refuse("pod_ended", f"pod {name} has ended ({phase})", node=node,
                              pod=name)
