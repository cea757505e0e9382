"""HTTP plumbing shared by the hub's API modules: JSON errors, who may call, ETag and Range.

Kept apart from the handlers so that the rollout API (``hub/api/fleet.py``) answers errors and
checks callers exactly as the registry API does. A caller is known by a bearer token (each with
a scope: ``admin`` changes things, ``read`` reads everything) or by a client certificate from
the fleet CA with the role ``agent`` (scope ``fetch``: downloads models and nothing else);
``authorize`` answers 401 to an unknown caller and 403 to one whose scope is too small. The
certificate bootstrap (``hub.api.pki``) never comes through ``authorize``: a pod proves itself
with its ServiceAccount token, which only the API server can judge and which is no API token
here (``tests/security/test_bootstrap_auth.py`` holds both ways). Range and conditional-request
rules follow RFC 9110 (single byte ranges only; a Range the server cannot parse is ignored, as
the RFC allows, and the whole representation is sent).
"""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import structlog
from aiohttp import hdrs, web

from hub.config import HubSettings
from hub.errors import ArtifactRejected, Forbidden, HubError, Unauthorized
from hub.pki import ca

log = structlog.get_logger(__name__)

#: What a caller may do, each scope including the ones before it: ``fetch`` downloads models
#: (an agent's certificate), ``read`` reads everything, ``admin`` also pushes, deletes and
#: rolls out.
Scope = Literal["fetch", "read", "admin"]
_RANK: dict[str, int] = {"fetch": 0, "read": 1, "admin": 2}
#: The certificate role that may fetch, and the scope it gets.
AGENT_ROLE = "agent"


@dataclass(frozen=True)
class ApiToken:
    """A bearer token the hub accepts, with its scope and its holder's name (for logs)."""

    secret: bytes
    scope: Scope
    name: str


@dataclass(frozen=True)
class Caller:
    """Who made a request: a token's holder or a node's certificate, and the scope."""

    name: str
    scope: Scope
    via: Literal["token", "certificate", "open"]


SETTINGS_KEY = web.AppKey("hub_settings", HubSettings)
#: The tokens the hub accepts (empty: none configured; every change is refused).
TOKENS_KEY = web.AppKey("hub_api_tokens", tuple[ApiToken, ...])
#: Who the request being handled came from, once ``authorize`` found out. aiohttp runs each
#: request in a task of its own, so the value never leaks from one request into another.
_CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("hub_caller",
                                                                       default=None)


def current_caller() -> Caller | None:
    """Who ``authorize`` found this request came from (None before, or when refused)."""
    return _CALLER.get()

STATUS_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    411: "length_required",
    413: "too_large",
    415: "unsupported_media_type",
    416: "range_not_satisfiable",
    417: "expectation_failed",
    422: "artifact_rejected",
    431: "headers_too_large",
}
_RANGE_RE = re.compile(r"^\s*bytes\s*=\s*(\d{0,19})\s*-\s*(\d{0,19})\s*$", re.IGNORECASE)


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None,
    reason: str | None = None,
) -> web.Response:
    """The one error body shape: ``{"error": {"code": ..., "message": ...[, "reason": ...]}}``."""
    body = {"code": code, "message": message}
    if reason is not None:
        body["reason"] = reason
    return web.json_response({"error": body}, status=status, headers=headers)


def hub_error_response(exc: HubError) -> web.Response:
    """A HubError as its JSON error response (401s carry ``WWW-Authenticate``)."""
    headers = {"WWW-Authenticate": 'Bearer realm="edge-hub"'} if exc.http_status == 401 else None
    reason = exc.reason if isinstance(exc, ArtifactRejected) else None
    return error_response(exc.http_status, exc.code, str(exc), headers, reason)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every failure into a JSON error; log mutating requests and all errors."""
    t0 = time.monotonic()
    status = 500
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    except HubError as exc:
        status = exc.http_status
        return hub_error_response(exc)
    except web.HTTPException as exc:
        status = exc.status
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k in (hdrs.ALLOW,)}
        message = exc.reason if exc.text is None or exc.text.startswith(str(exc.status)) \
            else exc.text
        return error_response(
            exc.status, STATUS_CODES.get(exc.status, "http_error"), message, headers
        )
    except (asyncio.CancelledError, ConnectionResetError):
        status = 499  # the client went away; nothing to answer
        raise
    except Exception:
        log.exception("request_failed", method=request.method, path=request.path)
        return error_response(500, "internal", "internal error; see the hub's log")
    finally:
        if status >= 400 or request.method not in ("GET", "HEAD"):
            caller = current_caller()
            log.info(
                "http_request", method=request.method, path=request.path, status=status,
                ms=round((time.monotonic() - t0) * 1000, 1),
                caller=None if caller is None else caller.name,
            )


def _token_caller(request: web.Request) -> Caller | None:
    """The caller a bearer token names; Unauthorized for a token the hub does not know."""
    scheme, _, value = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
    if not scheme and not value:
        return None
    if scheme.lower() != "bearer" or not value.strip():
        raise Unauthorized("malformed Authorization header (Authorization: Bearer TOKEN)")
    given = value.strip().encode("utf-8", "surrogateescape")
    found: ApiToken | None = None
    for token in request.app.get(TOKENS_KEY, ()):
        # compare with every token, so the time taken says nothing about which one matched
        if hmac.compare_digest(given, token.secret) and found is None:
            found = token
    if found is None:
        raise Unauthorized("unknown bearer token")
    return Caller(found.name, found.scope, "token")


def _certificate_caller(request: web.Request) -> Caller | None:
    """The node a verified client certificate of role ``agent`` names, if any."""
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if not isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:  # no certificate offered (the handshake refuses one that does not verify)
        return None
    try:
        name, role = ca.identity(ssl.DER_cert_to_PEM_cert(der).encode("ascii"))
    except (ca.PkiError, ValueError):
        return None
    if role != AGENT_ROLE:
        return None
    return Caller(f"node/{name}", "fetch", "certificate")


def authorize(request: web.Request, need: Scope) -> Caller:
    """The caller, if it may do what needs ``need``; Unauthorized (401) for an unknown caller,
    Forbidden (403) for a known one whose scope is too small.

    A token wins over a certificate (a human on an agent's box still acts as a human). With
    ``api.read_requires_token: false``, anyone may do what needs ``read`` or less.
    """
    if need == "admin" and not any(t.scope == "admin" for t in request.app.get(TOKENS_KEY, ())):
        raise Unauthorized("this hub has no admin API token configured; changes are disabled")
    caller = _token_caller(request) or _certificate_caller(request)
    settings = request.app[SETTINGS_KEY]
    if caller is None:
        if need != "admin" and not settings.api.read_requires_token:
            return Caller("anonymous", "read", "open")
        raise Unauthorized("missing bearer token (Authorization: Bearer TOKEN) or client "
                           "certificate")
    if _RANK[caller.scope] < _RANK[need]:
        what = {"admin": "push, delete and roll out", "read": "read the fleet, rollouts and "
                "metrics", "fetch": "download models"}[need]
        raise Forbidden(f"{caller.name} has scope {caller.scope}; to {what} needs {need}")
    _CALLER.set(caller)
    return caller


def quoted_etag(digest: str) -> str:
    """A strong entity tag for a content digest."""
    return f'"{digest}"'


def none_match(header: str | None, digest: str) -> bool:
    """True when an If-None-Match header matches the digest (weak comparison, ``*``)."""
    if not header:
        return False
    ours = quoted_etag(digest)
    for raw in header.split(","):
        tag = raw.strip()
        if tag == "*" or tag.removeprefix("W/") == ours:
            return True
    return False


class RangeNotSatisfiableError(Exception):
    """A syntactically valid byte range that lies outside the representation."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The (first, last) byte positions a Range header asks for, inclusive.

    None means "send everything": no header, a header this server does not parse (other units,
    several ranges, bad syntax). Raises RangeNotSatisfiableError for a range past the end.
    """
    if not header:
        return None
    m = _RANGE_RE.match(header)
    if m is None:
        return None
    first_s, last_s = m.group(1), m.group(2)
    if first_s == "" and last_s == "":
        return None
    if first_s == "":  # suffix: the last N bytes
        n = int(last_s)
        if n == 0 or size == 0:
            raise RangeNotSatisfiableError
        return max(0, size - n), size - 1
    first = int(first_s)
    if last_s and int(last_s) < first:
        return None  # invalid range-spec: ignore the header
    if first >= size:
        raise RangeNotSatisfiableError
    last = min(int(last_s), size - 1) if last_s else size - 1
    return first, last


def if_range_allows(header: str | None, digest: str) -> bool:
    """Whether a Range may be honoured under If-Range (strong match of our ETag only)."""
    return header is None or header.strip() == quoted_etag(digest)
