"""The fake Kubernetes API's authentication half: pods and their ServiceAccount tokens.

``tests/support/fake_k8s.py`` serves it beside the nodes. What the hub's certificate bootstrap
asks a real API server, answered the way a real one answers (the real ``kubernetes`` client
sends the requests and parses the answers):

* ``POST /apis/authentication.k8s.io/v1/tokenreviews``: 201 with the TokenReview echoed and a
  ``status``. A token the test issued is authenticated only for the audiences it was minted for
  (the review's ``spec.audiences``, else the API server's own), while unexpired, and while the
  pod it is bound to still exists with the same uid; then ``status.user`` is
  ``system:serviceaccount:NS:SA`` with the pod's name and uid (and, when asked for, its node,
  as servers from 1.30 add) in ``extra``, and ``status.audiences`` is the intersection. Anything
  else gets ``authenticated`` left out and an ``error``, exactly like the real thing.
* ``GET /api/v1/namespaces/{ns}/pods/{name}``: the Pod (``metadata.uid``, ``spec.nodeName``,
  ``spec.serviceAccountName``, ``status.phase``), or a 404 Status.

``reviews`` records what was asked (audiences, outcome), never the token. ``hold`` makes
reviews wait until it is set (a slow API server); pod reads take the fake's injected ``GET``
faults (``FakeKube.inject("GET", 500, node=POD)``).
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

#: The audiences of the API server itself (what a review without ``spec.audiences`` checks).
API_AUDIENCES = ("https://kubernetes.default.svc.cluster.local", "k3s")
EXTRA = "authentication.kubernetes.io/"


@dataclass(frozen=True)
class _Token:
    namespace: str
    service_account: str
    pod: str
    pod_uid: str
    node: str
    audiences: tuple[str, ...]
    expires_at: float
    node_info: bool


def status(code: int, reason: str, message: str) -> web.Response:
    """A ``Status`` failure object, as the API server answers errors."""
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}
    return web.Response(status=code, body=orjson.dumps(body), content_type="application/json")


class FakeIdentity:
    """Pods and the ServiceAccount tokens bound to them."""

    def __init__(self, log: Callable[[web.Request, int], None],
                 read_fault: Callable[[web.Request, str], Awaitable[web.Response | None]]) -> None:
        self._log = log
        self._read_fault = read_fault
        #: When set to an unset Event, every review waits for it (up to 30 s); ``held``
        #: counts the reviews waiting.
        self.hold: threading.Event | None = None
        self.held = 0
        self._lock = threading.Lock()
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self._tokens: dict[str, _Token] = {}
        #: (audiences asked, authenticated) per review, in order.
        self.reviews: list[tuple[tuple[str, ...], bool]] = []
        self._rv = 1000

    # ----------------------------------------------------------------- test-side controls
    def add_pod(self, namespace: str, name: str, *, node: str,
                service_account: str = "edge-agent", phase: str = "Running") -> str:
        """Create (or replace, with a new uid) a pod scheduled on ``node``; its uid."""
        uid = str(uuid.uuid4())
        with self._lock:
            self._rv += 1
            self.pods[(namespace, name)] = {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": namespace, "uid": uid,
                             "resourceVersion": str(self._rv),
                             "creationTimestamp": "2026-01-01T00:00:00Z",
                             "labels": {"app.kubernetes.io/name": "edge-agent"}},
                "spec": {"nodeName": node, "serviceAccountName": service_account,
                         "serviceAccount": service_account,
                         "containers": [{"name": "agent", "image": "edge-agent:0.1.0"}]},
                "status": {"phase": phase, "podIP": "10.42.0.9"},
            }
        return uid

    def delete_pod(self, namespace: str, name: str) -> None:
        with self._lock:
            self.pods.pop((namespace, name), None)

    def issue_token(self, namespace: str, pod: str, *, service_account: str | None = None,
                    audiences: tuple[str, ...] = ("edge-hub",), expires_in: float = 3600.0,
                    node_info: bool = False) -> str:
        """A projected token bound to pod ``namespace/pod`` (which must exist), as the kubelet
        would mint it; ``service_account`` defaults to the pod's; ``expires_in`` < 0 gives a
        token that has already expired."""
        with self._lock:
            obj = self.pods[(namespace, pod)]
            token = "eyJfake." + secrets.token_urlsafe(32)
            self._tokens[token] = _Token(
                namespace, service_account or obj["spec"]["serviceAccountName"], pod,
                obj["metadata"]["uid"], obj["spec"]["nodeName"], tuple(audiences),
                time.time() + expires_in, node_info)
        return token

    # -------------------------------------------------------------------------- answers
    def _authenticate(self, token: str, wanted: tuple[str, ...]) -> dict[str, Any]:
        with self._lock:
            t = self._tokens.get(token)
            pod = self.pods.get((t.namespace, t.pod)) if t is not None else None
        if t is None:
            return {"user": {}, "error": "[invalid bearer token, square/go-jose: error in "
                    "cryptographic primitive, token lookup failed]"}
        common = [a for a in wanted if a in t.audiences]
        if not common:
            return {"user": {}, "error": f"[invalid bearer token, token audiences "
                    f"{list(t.audiences)} is invalid for the target audiences {list(wanted)}]"}
        if time.time() >= t.expires_at:
            return {"user": {}, "error": "[invalid bearer token, service account token has "
                    "expired]"}
        if pod is None or pod["metadata"]["uid"] != t.pod_uid:
            return {"user": {}, "error": f"[invalid bearer token, pod \"{t.pod}\" not found or "
                    "its uid changed: token has been invalidated]"}
        extra = {EXTRA + "pod-name": [t.pod], EXTRA + "pod-uid": [t.pod_uid],
                 EXTRA + "credential-id": [f"JTI={uuid.uuid4()}"]}
        if t.node_info:
            extra |= {EXTRA + "node-name": [t.node], EXTRA + "node-uid": [f"uid-{t.node}"]}
        user = {"username": f"system:serviceaccount:{t.namespace}:{t.service_account}",
                "uid": str(uuid.uuid5(uuid.NAMESPACE_DNS, t.service_account)),
                "groups": ["system:serviceaccounts", f"system:serviceaccounts:{t.namespace}",
                           "system:authenticated"],
                "extra": extra}
        return {"authenticated": True, "user": user, "audiences": common}

    async def token_review(self, request: web.Request) -> web.Response:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            self._log(request, 400)
            return status(400, "BadRequest", "the body is not JSON")
        spec = body.get("spec") if isinstance(body, dict) else None
        token = spec.get("token") if isinstance(spec, dict) else None
        if not isinstance(token, str) or body.get("kind") != "TokenReview":
            self._log(request, 422)
            return status(422, "Invalid", "TokenReview.authentication.k8s.io is invalid: "
                          "spec.token: Required value")
        wanted = tuple(spec.get("audiences") or API_AUDIENCES)
        if self.hold is not None:
            self.held += 1
            try:
                await asyncio.to_thread(self.hold.wait, 30)
            finally:
                self.held -= 1
        result = self._authenticate(token, wanted)
        with self._lock:
            self.reviews.append((wanted, result.get("authenticated") is True))
        out = {"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
               "metadata": {"creationTimestamp": None}, "spec": spec, "status": result}
        self._log(request, 201)
        return web.Response(status=201, body=orjson.dumps(out), content_type="application/json")

    async def get_pod(self, request: web.Request) -> web.Response:
        ns, name = request.match_info["namespace"], request.match_info["name"]
        failed = await self._read_fault(request, name)
        if failed is not None:
            return failed
        with self._lock:
            obj = self.pods.get((ns, name))
            data = orjson.dumps(obj) if obj is not None else None
        if data is None:
            self._log(request, 404)
            return status(404, "NotFound", f'pods "{name}" not found')
        self._log(request, 200)
        return web.Response(body=data, content_type="application/json")

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/apis/authentication.k8s.io/v1/tokenreviews", self.token_review)
        app.router.add_get("/api/v1/namespaces/{namespace}/pods/{name}", self.get_pod)
