"""The fleet page's static files (``GET /``, ``GET /ui/{name}``) and ``setup`` of this package.

The files are package data (``hub/web/static``, listed in pyproject.toml's package-data so a
wheel carries them), read once when the app is built and served from memory with a strong
ETag. They hold no data and no secret, so they are public like ``/healthz``; everything they
show is fetched from the token-protected API. Every answer carries a Content-Security-Policy
that lets the page load scripts, styles and data from the hub alone (no inline script, no
other origin, no framing), so a label value that looks like HTML cannot run as code, and
``nosniff`` so a file is only ever what its type says.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from typing import Any

from aiohttp import hdrs, web

from hub.api import openapi, ports
from hub.api.httputil import none_match, quoted_etag
from hub.errors import NotFound
from hub.web import openapi as web_openapi
from hub.web import stream

#: The types of the files the page is made of; a file of another kind is not served.
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
#: Everything the page may load comes from the hub; data only through ``fetch`` to the hub.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


@dataclass(frozen=True)
class StaticFile:
    """One file of the page, in memory."""

    body: bytes
    content_type: str
    digest: str


FILES_KEY = web.AppKey("hub_dashboard_files", dict[str, StaticFile])


def load_files() -> dict[str, StaticFile]:
    """Every servable file of ``hub/web/static`` by name (read once; they are small)."""
    out: dict[str, StaticFile] = {}
    for entry in resources.files("hub.web").joinpath("static").iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in CONTENT_TYPES:
            body = entry.read_bytes()
            out[entry.name] = StaticFile(body, CONTENT_TYPES[suffix],
                                         hashlib.sha256(body).hexdigest()[:32])
    if "index.html" not in out:
        raise RuntimeError("hub/web/static/index.html is missing: the package is incomplete")
    return out


def _serve(request: web.Request, name: str) -> web.Response:
    f = request.app[FILES_KEY].get(name)
    if f is None or (name == "index.html" and request.path != "/"):
        raise NotFound(f"no such file of the fleet page: {name!r}")
    headers = {**SECURITY_HEADERS, hdrs.ETAG: quoted_etag(f.digest),
               hdrs.CACHE_CONTROL: "no-cache"}
    if none_match(request.headers.get(hdrs.IF_NONE_MATCH), f.digest):
        return web.Response(status=304, headers=headers)
    headers[hdrs.CONTENT_TYPE] = f.content_type
    return web.Response(body=f.body, headers=headers)


async def index(request: web.Request) -> web.Response:
    """``GET /``: the page."""
    return _serve(request, "index.html")


async def asset(request: web.Request) -> web.Response:
    """``GET /ui/{name}``: a script, style sheet or icon of the page."""
    return _serve(request, request.match_info["name"])


def setup(app: web.Application, control: ports.FleetControl, *,
          openapi_doc: dict[str, Any] | None = None) -> None:
    """Add the page and its change stream to ``app``; the stream asks ``control``. The caller
    owns ``control``'s lifetime; open streams end (with a ``bye`` line) on app shutdown."""
    app[FILES_KEY] = load_files()
    app[stream.WATCHER_KEY] = stream.Watcher(control)
    app.router.add_get("/", index)
    app.router.add_get("/ui/{name}", asset)
    app.router.add_get("/v1/stream", stream.stream)

    async def close_streams(app: web.Application) -> None:
        await app[stream.WATCHER_KEY].aclose()

    app.on_shutdown.append(close_streams)
    if openapi_doc is not None:
        openapi.add_paths(openapi_doc, web_openapi.PATHS)
