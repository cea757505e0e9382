"""A small asyncio HTTP client for the hub's API, used by the ``edge-hub`` CLI verbs.

It turns the hub's JSON errors back into the same ``HubError`` classes the server raised (so a
refused push exits non-zero with the server's message), streams uploads from disk with a
progress callback, and never reads an artifact whole into memory. It speaks HTTPS, verifying
the hub against a CA file (``--ca-file``: the fleet CA, whose server certificate the hub
holds) or the system's store, may present a client certificate, and sends its token to the
hub's URL only: no redirect is followed, and a token never goes over plain HTTP beyond
loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import os
import ssl
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yarl
from aiohttp import hdrs
from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import Payload

from edge_agent.common import cli, httpserver
from edge_agent.common import settings as common_settings
from hub.errors import (
    ArtifactRejected,
    Conflict,
    Forbidden,
    HubError,
    InvalidRequest,
    NotFound,
    TooLarge,
    Unauthorized,
)

DEFAULT_HUB_URL = "https://127.0.0.1:8081"
#: Bytes per read when streaming a file up or down.
CHUNK = 1024 * 1024

_BY_STATUS: dict[int, type[HubError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: TooLarge,
    422: ArtifactRejected,
}

Progress = Callable[[int], None]
#: What a client verb runs: the parsed arguments in, the exit status out, in an event loop.
AsyncVerb = Callable[[argparse.Namespace], Coroutine[Any, Any, int]]


class UnreachableError(HubError, code="unreachable", exit_code=3):
    """The hub did not answer (connection refused, DNS, timeout)."""


#: Said in the description of every verb group that talks to the hub.
CONNECTION_NOTE = ("The hub URL comes from --hub or EDGE_HUB_URL, the token from --token-file "
                   "or EDGE_HUB_TOKEN, the CA that signed the hub's certificate from --ca-file "
                   "or EDGE_HUB_CA_FILE.")


def add_client_verb(sub: Any, name: str, run: AsyncVerb, *, help: str,
                    description: str | None = None) -> argparse.ArgumentParser:
    """Add verb (or action) ``name`` that talks to the hub: ``run`` is awaited in its own event
    loop; ``description`` defaults to its docstring. ``--hub``, ``--token-file``, the TLS
    files, ``--timeout`` and ``--json`` are added to the returned parser, which the verb adds
    its own arguments to."""
    p = cli.add_verb(sub, name, lambda args: asyncio.run(run(args)), help=help,
                     description=inspect.getdoc(run) if description is None else description)
    conn = p.add_argument_group("connection to the hub")
    conn.add_argument(
        "--hub", metavar="URL", default=None,
        help=f"hub base URL (env EDGE_HUB_URL; default {DEFAULT_HUB_URL})",
    )
    conn.add_argument(
        "--token-file", metavar="FILE", type=Path, default=None,
        help="file holding the API bearer token (env EDGE_HUB_TOKEN holds the token itself)",
    )
    conn.add_argument(
        "--ca-file", metavar="PEM", type=Path, default=None,
        help="CA certificate that signed the hub's (env EDGE_HUB_CA_FILE; default: the "
        "system's trusted CAs)",
    )
    conn.add_argument(
        "--cert-file", metavar="PEM", type=Path, default=None,
        help="client certificate to present (env EDGE_HUB_CERT_FILE; optional)",
    )
    conn.add_argument(
        "--key-file", metavar="PEM", type=Path, default=None,
        help="its private key, mode 0600 (env EDGE_HUB_KEY_FILE)",
    )
    conn.add_argument(
        "--timeout", metavar="S", type=float, default=30.0,
        help="seconds to wait for the hub to answer a request (default 30)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def client_ssl_context(ca_file: Path | None, cert_file: Path | None = None,
                       key_file: Path | None = None) -> ssl.SSLContext:
    """A TLS context that verifies the hub (against ``ca_file``, else the system's CAs) and
    presents ``cert_file`` when given; InvalidRequest naming the file that cannot be used."""
    what, path = "--ca-file", ca_file
    try:
        ctx = ssl.create_default_context(cafile=None if ca_file is None else str(ca_file))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if cert_file is not None:
            what, path = "--key-file", key_file or cert_file
            common_settings.check_secret_file(key_file or cert_file)
            what, path = "--cert-file", cert_file
            ctx.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise InvalidRequest(f"cannot use {what} {path}: {reason}") from exc
    return ctx


def client_from_args(args: argparse.Namespace) -> HubClient:
    """A client configured from the common arguments and the environment."""
    url = args.hub or os.environ.get("EDGE_HUB_URL") or DEFAULT_HUB_URL
    if not url.startswith(("http://", "https://")):
        raise InvalidRequest(f"--hub must be an http(s) URL, got {url!r}")
    token: str | None
    if args.token_file is not None:
        try:
            token = common_settings.read_secret(args.token_file) or None
        except OSError as exc:
            raise InvalidRequest(f"cannot read --token-file {args.token_file}: {exc.strerror}") \
                from exc
    else:
        token = os.environ.get("EDGE_HUB_TOKEN") or None

    def path_of(value: Path | None, env: str) -> Path | None:
        return value if value is not None else (Path(os.environ[env]) if os.environ.get(env)
                                                else None)

    tls = None
    if url.startswith("https://"):
        tls = client_ssl_context(path_of(args.ca_file, "EDGE_HUB_CA_FILE"),
                                 path_of(args.cert_file, "EDGE_HUB_CERT_FILE"),
                                 path_of(args.key_file, "EDGE_HUB_KEY_FILE"))
    return HubClient(url, token=token, timeout_s=args.timeout, ssl_context=tls)


class FilePayload(Payload):
    """A file streamed from disk in 1 MiB reads (in a thread), reporting progress."""

    def __init__(self, path: Path, size: int, progress: Progress | None = None) -> None:
        super().__init__(path, content_type="application/octet-stream", filename=path.name)
        self._size = size
        self._path = path
        self._progress = progress

    async def write(self, writer: AbstractStreamWriter) -> None:
        f = await asyncio.to_thread(open, self._path, "rb")
        try:
            while chunk := await asyncio.to_thread(f.read, CHUNK):
                await writer.write(chunk)
                if self._progress is not None:
                    self._progress(len(chunk))
        finally:
            await asyncio.to_thread(f.close)

    async def write_with_length(
        self, writer: AbstractStreamWriter, content_length: int | None
    ) -> None:
        await self.write(writer)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        raise TypeError("a model file is binary")


def _json_or_none(raw: bytes) -> Any:
    try:
        return orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        return None


def _error_from(status: int, body: Any, reason: str, *, token_sent: bool = True) -> HubError:
    cls = _BY_STATUS.get(status, HubError)
    code, message = "", reason
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        code = str(body["error"].get("code", ""))
        message = str(body["error"].get("message", reason))
    hint = ""
    if status == 401:
        hint = ("; no token was sent: pass one with --token-file FILE or EDGE_HUB_TOKEN"
                if not token_sent else
                "; the token sent (--token-file or EDGE_HUB_TOKEN) was not accepted")
    return cls(f"{message} ({code or status}){hint}")


def _check_redirect(resp: aiohttp.ClientResponse) -> None:
    if 300 <= resp.status < 400 and resp.status != 304:
        where = resp.headers.get(hdrs.LOCATION, "?")[:200]
        raise HubError(f"the hub answered {resp.status} to {where}; redirects are not "
                       "followed (the token goes to --hub only)")


def _tls_error(base_url: str, exc: aiohttp.ClientSSLError) -> HubError:
    return UnreachableError(f"TLS with the hub at {base_url} failed: {exc}; is --ca-file "
                            "(EDGE_HUB_CA_FILE) the CA that signed the hub's certificate?")


class HubClient:
    """Requests to one hub. Use as ``async with HubClient(url, token=...) as hub:``."""

    def __init__(self, base_url: str, *, token: str | None = None, timeout_s: float = 30.0,
                 ssl_context: ssl.SSLContext | None = None):
        self.base_url = base_url.rstrip("/")
        parts = yarl.URL(self.base_url)
        if token and parts.scheme == "http" and not httpserver.is_loopback(parts.host):
            raise InvalidRequest(f"refusing to send the API token over plain HTTP to "
                                 f"{parts.host}: use https://")
        self.token = token
        self.timeout_s = timeout_s
        self.ssl_context = ssl_context
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> HubClient:
        # no total timeout: a large upload or download may take long; each read may not
        timeout = aiohttp.ClientTimeout(
            total=None, connect=self.timeout_s, sock_read=self.timeout_s
        )
        connector = aiohttp.TCPConnector(ssl=self.ssl_context if self.ssl_context else True)
        self._session = aiohttp.ClientSession(timeout=timeout, raise_for_status=False,
                                              connector=connector)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        h = dict(extra or {})
        if self.token:
            h[hdrs.AUTHORIZATION] = f"Bearer {self.token}"
        return h

    async def request(self, method: str, path: str, **kw: Any) -> tuple[int, bytes]:
        """Send a request; return (status, body bytes) or raise the mapped HubError."""
        assert self._session is not None, "use 'async with'"
        headers = self._headers(kw.pop("headers", None))
        try:
            async with self._session.request(
                method, self.base_url + path, headers=headers, allow_redirects=False, **kw
            ) as resp:
                raw = await resp.read()
                _check_redirect(resp)
                if resp.status >= 400:
                    raise _error_from(resp.status, _json_or_none(raw), resp.reason or "",
                                      token_sent=bool(self.token))
                return resp.status, raw
        except aiohttp.ClientSSLError as exc:
            raise _tls_error(self.base_url, exc) from exc
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
            raise UnreachableError(f"cannot reach the hub at {self.base_url}: {exc or 'timeout'}") \
                from exc

    async def request_json(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        """Send a request; return (status, JSON body) or raise the mapped HubError."""
        status, raw = await self.request(method, path, **kw)
        body = _json_or_none(raw)
        if body is None:
            raise HubError(f"the hub answered {status} without a JSON body")
        return status, body

    async def download(
        self,
        path: str,
        dest: Path,
        *,
        headers: dict[str, str] | None = None,
        append: bool = False,
        progress: Progress | None = None,
        on_start: Callable[[aiohttp.ClientResponse], bool] | None = None,
    ) -> aiohttp.ClientResponse:
        """GET ``path`` into ``dest`` in 1 MiB pieces (written in a thread).

        ``on_start(response)`` may inspect the status and headers and return True to write
        in append mode (a 206 that continues ``dest``) or False to truncate. 4xx raise.
        """
        assert self._session is not None, "use 'async with'"
        try:
            async with self._session.get(
                self.base_url + path, headers=self._headers(headers), allow_redirects=False
            ) as resp:
                _check_redirect(resp)
                if resp.status >= 400:
                    raw = await resp.read()
                    raise _error_from(resp.status, _json_or_none(raw), resp.reason or "",
                                      token_sent=bool(self.token))
                mode = "ab" if (on_start(resp) if on_start else append) else "wb"
                f = await asyncio.to_thread(open, dest, mode)
                try:
                    async for chunk in resp.content.iter_chunked(CHUNK):
                        await asyncio.to_thread(f.write, chunk)
                        if progress is not None:
                            progress(len(chunk))
                finally:
                    await asyncio.to_thread(f.close)
                return resp
        except aiohttp.ClientSSLError as exc:
            raise _tls_error(self.base_url, exc) from exc
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
            raise UnreachableError(f"download from {self.base_url} failed: {exc or 'timeout'}") \
                from exc
