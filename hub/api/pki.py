"""The certificate bootstrap over HTTP: ``POST /v1/pki/bootstrap``, and its counters.

An agent pod on K3s sends its projected ServiceAccount token as a bearer token and a JSON body
``{"node": NAME, "csr": PEM}``; ``hub.pki.bootstrap.Bootstrapper`` decides (TokenReview, pod,
node, ServiceAccount) and signs. This module only speaks HTTP around it: the body is bounded
before it is read, every failure is a JSON error (403 refused, 401 no token, 400 bad body, 413
too large, 429 busy, 503 API server or CA unavailable), and the counters go to ``/metrics``.
The hub's own API token plays no part here: the API server is the authority on who a pod is.

Routes::

    POST /v1/pki/bootstrap     a certificate for the node the caller's pod runs on
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
from aiohttp import hdrs, web
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from edge_agent.contract import protocol
from hub.api import httputil, openapi
from hub.errors import InvalidRequest, TooLarge
from hub.pki import bootstrap

BOOTSTRAP_KEY = web.AppKey("hub_pki_bootstrap", bootstrap.Bootstrapper)
BOOTSTRAP_PATH = protocol.BOOTSTRAP_PATH
#: Largest bootstrap body, bytes: a P-256 CSR in PEM is about 500 bytes, a node name at most
#: 253; 16 KiB leaves room and refuses anything else before it is read.
MAX_BODY_BYTES = 16 * 1024


def _bearer(request: web.Request) -> str | None:
    scheme, _, value = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
    return (value.strip() or None) if scheme.lower() == "bearer" else None


async def _body(request: web.Request, b: bootstrap.Bootstrapper) -> tuple[str, bytes]:
    """The claimed node and the CSR, read within ``MAX_BODY_BYTES``; counted refusals."""
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise b.count("too_large", TooLarge(f"body over {MAX_BODY_BYTES} bytes"))
    raw = bytearray()
    async for chunk in request.content.iter_chunked(4096):
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:  # a chunked body without a length: stop reading here
            raise b.count("too_large", TooLarge(f"body over {MAX_BODY_BYTES} bytes"))
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise b.count("bad_request", InvalidRequest(f"body is not JSON: {exc}")) from exc
    if not isinstance(body, dict) or set(body) != {"node", "csr"} \
            or not isinstance(body["node"], str) or not isinstance(body["csr"], str):
        raise b.count("bad_request", InvalidRequest(
            'body must be {"node": NODE_NAME, "csr": PEM_CERTIFICATE_REQUEST}'))
    return body["node"], body["csr"].encode("utf-8", "surrogateescape")


async def bootstrap_certificate(request: web.Request) -> web.Response:
    """Sign the caller's CSR for the node its pod runs on (see ``hub.pki.bootstrap``)."""
    b = request.app[BOOTSTRAP_KEY]
    try:
        node, csr = await _body(request, b)
    except TooLarge as exc:
        # the rest of the body is never read into memory: the answer closes the connection
        # (aiohttp discards what is still in flight for a moment, so the client sees the 413)
        resp = httputil.hub_error_response(exc)
        resp.force_close()
        return resp
    grant = await b.bootstrap(token=_bearer(request), node=node, csr_pem=csr)
    body = {
        "node": grant.node,
        "role": "agent",
        "certificate": grant.issued.cert_pem.decode(),
        "ca": grant.ca_pem.decode(),
        "serial": f"{grant.issued.serial:x}",
        "not_after": grant.issued.not_after.isoformat(),
    }
    return web.Response(body=orjson.dumps(body), content_type="application/json",
                        headers={"Cache-Control": "no-store"})


class BootstrapCollector(Collector):
    """The bootstrap's counters, read at scrape time."""

    def __init__(self, b: bootstrap.Bootstrapper) -> None:
        self.b = b

    def collect(self) -> Iterator[Metric]:
        stats = self.b.stats
        yield CounterMetricFamily("edge_hub_pki_bootstrap_issued",
                                  "certificates signed for agent pods", value=stats.issued)
        refused = CounterMetricFamily("edge_hub_pki_bootstrap_refused",
                                      "bootstrap requests refused, by reason", labels=["reason"])
        for reason, n in sorted(stats.refused.items()):
            refused.add_metric([reason], n)
        yield refused


_ERROR = {"$ref": "#/components/schemas/Error"}


def _err(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ERROR}}}


PATHS: dict[str, Any] = {
    BOOTSTRAP_PATH: {
        "post": {
            "summary": "A certificate for the node the caller's agent pod runs on (K3s)",
            "description": "Authenticated by the pod's projected ServiceAccount token "
            "(audience pki.bootstrap.audience) as the bearer token, checked by a TokenReview; "
            "the pod must run on the claimed node under the agents' ServiceAccount. Signs the "
            "CSR's key for exactly that node, role agent, for pki.bootstrap.cert_ttl_s.",
            "security": [{"bearerAuth": []}],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/BootstrapRequest"}}}},
            "responses": {
                "200": {"description": "signed", "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/BootstrapGrant"}}}},
                "400": _err("not JSON, not a P-256 CSR, or a bad node name (invalid_request)"),
                "401": _err("no bearer token (unauthorized)"),
                "403": _err("refused: token, pod, node or ServiceAccount do not match, or "
                            "bootstrap is off (bootstrap_refused)"),
                "413": _err(f"body over {MAX_BODY_BYTES} bytes (too_large)"),
                "429": _err("too many bootstraps at once; retry with backoff (busy)"),
                "503": _err("the API server cannot be asked, or the CA cannot sign"),
            },
        },
    },
}

SCHEMAS: dict[str, Any] = {
    "BootstrapRequest": {
        "type": "object",
        "required": ["node", "csr"],
        "additionalProperties": False,
        "properties": {
            "node": {"type": "string", "description": "the node the pod says it runs on"},
            "csr": {"type": "string", "description": "PEM certificate request, ECDSA P-256"},
        },
    },
    "BootstrapGrant": {
        "type": "object",
        "required": ["node", "role", "certificate", "ca", "serial", "not_after"],
        "properties": {
            "node": {"type": "string"},
            "role": {"type": "string", "enum": ["agent"]},
            "certificate": {"type": "string", "description": "PEM, subject CN = node"},
            "ca": {"type": "string", "description": "PEM of the CA that signed it"},
            "serial": {"type": "string", "description": "hex"},
            "not_after": {"type": "string", "format": "date-time"},
        },
    },
}


def setup(app: web.Application, b: bootstrap.Bootstrapper, *,
          metrics_registry: CollectorRegistry | None = None,
          openapi_doc: dict[str, Any] | None = None) -> None:
    """Add the bootstrap route to ``app``, its counters to ``metrics_registry`` and its path to
    the OpenAPI document."""
    app[BOOTSTRAP_KEY] = b
    app.router.add_post(BOOTSTRAP_PATH, bootstrap_certificate)
    if metrics_registry is not None:
        metrics_registry.register(BootstrapCollector(b))
    if openapi_doc is not None:
        openapi.add_paths(openapi_doc, PATHS, SCHEMAS)
