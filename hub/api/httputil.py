"""HTTP plumbing shared by the hub's API modules: JSON errors, bearer auth, ETag and Range.

Kept apart from the handlers so that the rollout API (``hub/api/fleet.py``) answers errors and
checks tokens exactly as the registry API does. Range and conditional-request rules follow
RFC 9110 (single byte ranges only; a Range the server cannot parse is ignored, as the RFC
allows, and the whole representation is sent).
"""

from __future__ import annotations

import asyncio
import hmac
import re
import time
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import hdrs, web

from hub.config import HubSettings
from hub.errors import ArtifactRejected, HubError, Unauthorized

log = structlog.get_logger(__name__)

SETTINGS_KEY = web.AppKey("hub_settings", HubSettings)
#: The bearer token mutating requests must carry (None: none configured, writes refused).
TOKEN_KEY = web.AppKey("hub_api_token", str)

_STATUS_CODES = {
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
            exc.status, _STATUS_CODES.get(exc.status, "http_error"), message, headers
        )
    except (asyncio.CancelledError, ConnectionResetError):
        status = 499  # the client went away; nothing to answer
        raise
    except Exception:
        log.exception("request_failed", method=request.method, path=request.path)
        return error_response(500, "internal", "internal error; see the hub's log")
    finally:
        if status >= 400 or request.method not in ("GET", "HEAD"):
            log.info(
                "http_request", method=request.method, path=request.path, status=status,
                ms=round((time.monotonic() - t0) * 1000, 1),
            )


def authorize(request: web.Request, *, write: bool) -> None:
    """Raise Unauthorized unless the request may proceed.

    Writes always need the bearer token; reads only with ``api.read_requires_token``. A hub
    without a configured token refuses every write (fail closed).
    """
    settings = request.app[SETTINGS_KEY]
    if not write and not settings.api.read_requires_token:
        return
    token = request.app.get(TOKEN_KEY)
    if not token:
        raise Unauthorized("this hub has no API token configured; writes are disabled")
    scheme, _, value = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise Unauthorized("missing bearer token (Authorization: Bearer TOKEN)")
    given = value.strip().encode("utf-8", "surrogateescape")
    if not hmac.compare_digest(given, token.encode("utf-8")):
        raise Unauthorized("wrong bearer token")


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
