"""Downloads of model artifacts from the hub: resumable, bounded, and honest about failures.

A site uplink drops, a hub restarts during a rollout, and a 300 MB model must not start over
each time. So an artifact is streamed into a ``.part`` file named by the sha256 it must have; a
retry (or an agent restart) resumes it with ``Range``. Retries are bounded, spaced by the shared
backoff with jitter (``edge_agent.common.backoff``: a fleet must not retry in lockstep), and the
whole fetch has a total timeout. Errors are typed: ``TemporaryError`` when retries ran out on
something that may heal (connection, timeout, 5xx), ``ModelError`` when retrying is pointless
(404, 401, too large).

The digest is computed while the bytes arrive; nothing here decides whether the bytes are a model
(``modelcache`` verifies the digest and signature, the engine the rest).

Credentials go to the hub only. The agent proves who it is with its client certificate
(``hub.cert_file``, mutual TLS, re-read for every fetch so a renewed certificate is used at
once) and verifies the hub against ``hub.ca_file``; a token, when one is configured, rides along.
A URL off the hub's origin (scheme, host, port of ``hub.url``) is refused before any connection
(``same_origin``), redirects are not followed, and a response body never becomes an error
message: errors are our own words (they reach the node's ``state``, which the hub shows), the
body only goes, truncated, into the log.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import structlog

from edge_agent.common import backoff
from edge_agent.common import settings as common_settings
from edge_agent.errors import ModelError, TemporaryError

if TYPE_CHECKING:
    from edge_agent.config import HubClientSettings

log = structlog.get_logger(__name__)

#: Bytes buffered before one write+hash step runs in a worker thread.
_WRITE_CHUNK = 1024 * 1024
#: Statuses worth retrying: the hub is restarting, overloaded or a proxy timed out.
_RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
#: Longest piece of a foreign error body written to the log (never into an error message).
_BODY_QUOTE = 200
#: Longest piece of our own reason text for a connection failure.
_REASON_CHARS = 200
_DEFAULT_PORTS = {"http": 80, "https": 443}

Sleep = Callable[[float], Awaitable[None]]
_T = TypeVar("_T")


@dataclass
class FetchStats:
    """What a fetch did, for logs and tests: attempts, resumed bytes, backoff waits."""

    attempts: int = 0
    resumed_from: list[int] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)


def origin_of(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an http(s) URL without credentials in it; None otherwise."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname or "@" in parts.netloc:
        return None
    return scheme, parts.hostname.lower(), port or _DEFAULT_PORTS[scheme]


def same_origin(url: str, hub_url: str) -> bool:
    """Whether ``url`` is on the hub's origin (scheme, host and port of ``hub_url``)."""
    ours = origin_of(hub_url)
    return ours is not None and origin_of(url) == ours


class _RetryError(Exception):
    """An attempt failed in a way worth retrying; ``reason`` says how."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Fetcher:
    """Fetches manifests (small, in memory) and artifacts (streamed to disk) over HTTP.

    Its limits are the ``hub`` settings' (timeouts, retries, backoff bounds; an artifact may be
    as large as the cache). ``sleep`` and ``rng`` are injectable so the backoff is tested without
    wall-clock waits.
    """

    def __init__(
        self,
        settings: HubClientSettings,
        *,
        token: str | None = None,
        exposed_files: common_settings.SecretFilePolicy = "refuse",
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self._token = token
        self._exposed_files = exposed_files
        self._sleep = sleep
        self._rng = rng or random.Random()

    def _headers(self) -> dict[str, str]:
        if self._token:
            return {"Authorization": f"Bearer {self._token}"}
        return {}

    def _ssl_context(self) -> ssl.SSLContext | None:
        """Verify the hub against ``ca_file`` and present ``cert_file`` (read now, so a renewed
        certificate counts from the next fetch); None: aiohttp's default verification."""
        s = self.settings
        if s.ca_file is None and s.cert_file is None:
            return None
        field, path = "hub.ca_file", s.ca_file
        try:
            ctx = ssl.create_default_context(cafile=None if s.ca_file is None else str(s.ca_file))
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            if s.cert_file is not None:
                field, path = "hub.key_file", s.key_file or s.cert_file
                common_settings.check_secret_file(s.key_file or s.cert_file, self._exposed_files)
                field, path = "hub.cert_file", s.cert_file
                ctx.load_cert_chain(s.cert_file, s.key_file)
        except (OSError, ssl.SSLError) as exc:
            reason = getattr(exc, "strerror", None) or type(exc).__name__
            raise ModelError(f"{field} {path} cannot be used: {reason}") from exc
        return ctx

    def _check_origin(self, url: str) -> None:
        """Refuse, before any connection, a URL off the hub's origin (when ``url`` is set)."""
        hub = self.settings.url
        if hub is not None and not same_origin(url, hub):
            raise ModelError(f"refused to fetch {url[:120]}: not on the hub's origin {hub}")

    async def _session(self) -> aiohttp.ClientSession:
        stall = self.settings.stall_timeout_s
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=stall, sock_read=stall)
        tls = await asyncio.to_thread(self._ssl_context)
        connector = aiohttp.TCPConnector(ssl=tls if tls is not None else True)
        return aiohttp.ClientSession(timeout=timeout, headers=self._headers(),
                                     connector=connector)

    async def fetch_bytes(self, url: str, max_bytes: int = 1024 * 1024) -> bytes:
        """GET a small document (a manifest) with the same retries and total timeout."""

        async def attempt(session: aiohttp.ClientSession) -> bytes:
            async with session.get(url, allow_redirects=False) as resp:
                await _check_status(resp, url)
                if resp.content_length is not None and resp.content_length > max_bytes:
                    raise ModelError(f"{url}: document of {resp.content_length} bytes is too big")
                body = bytearray()
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) > max_bytes:
                        raise ModelError(f"{url}: document is larger than {max_bytes} bytes")
                if resp.content_length is not None and len(body) != resp.content_length:
                    raise _RetryError(f"short body: {len(body)} of {resp.content_length} bytes")
                return bytes(body)

        return await self._with_retries(url, attempt, FetchStats())

    async def fetch_file(self, url: str, part: Path, stats: FetchStats | None = None) -> str:
        """Download ``url`` into ``part`` (resuming what it holds); return the file's sha256.

        The caller compares the digest and renames the file; on any exception the partial file
        stays for the next attempt to resume (the caller deletes it when it proves wrong).
        """
        stats = stats if stats is not None else FetchStats()
        part.parent.mkdir(parents=True, exist_ok=True)

        async def attempt(session: aiohttp.ClientSession) -> str:
            return await self._attempt_file(session, url, part, stats)

        return await self._with_retries(url, attempt, stats)

    async def _with_retries(
        self,
        url: str,
        attempt: Callable[[aiohttp.ClientSession], Awaitable[_T]],
        stats: FetchStats,
    ) -> _T:
        s = self.settings
        self._check_origin(url)

        async def loop() -> _T:
            async with await self._session() as session:
                last = ""
                for n in range(s.download_retries + 1):
                    if n:
                        delay = backoff.delay(n - 1, s.retry_min_s, s.retry_max_s,
                                              self._rng.random)
                        stats.waits.append(delay)
                        log.info("model_fetch_retry", url=url, attempt=n, wait_s=round(delay, 3),
                                 reason=last)
                        await self._sleep(delay)
                    stats.attempts += 1
                    try:
                        return await attempt(session)
                    except _RetryError as exc:
                        last = exc.reason
                    except aiohttp.ClientSSLError as exc:  # retrying cannot fix a certificate
                        raise ModelError(f"{url[:120]}: TLS with the hub failed "
                                         f"({type(exc).__name__}); check hub.ca_file and "
                                         "hub.cert_file") from exc
                    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
                        last = f"{type(exc).__name__}: {exc}"[:_REASON_CHARS]
                    except asyncio.TimeoutError:
                        last = "stalled (no bytes within stall_timeout_s)"
                raise TemporaryError(
                    f"{url}: giving up after {stats.attempts} attempts: {last}"
                )

        try:
            return await asyncio.wait_for(loop(), s.download_timeout_s)
        except asyncio.TimeoutError as exc:
            raise TemporaryError(f"{url}: not fetched within {s.download_timeout_s:g} s") from exc

    async def _attempt_file(
        self, session: aiohttp.ClientSession, url: str, part: Path, stats: FetchStats
    ) -> str:
        have = await asyncio.to_thread(_size_or_zero, part)
        headers = {"Range": f"bytes={have}-"} if have else {}
        async with session.get(url, headers=headers, allow_redirects=False) as resp:
            if resp.status == 416 and have:
                # what we hold is not a prefix of what the server has: start over
                await asyncio.to_thread(part.unlink, True)
                raise _RetryError("range not satisfiable; restarting from byte 0")
            await _check_status(resp, url)
            resuming = have > 0 and resp.status == 206
            if resuming and not _range_starts_at(resp.headers.get("Content-Range"), have):
                await asyncio.to_thread(part.unlink, True)
                raise _RetryError("server answered a different range; restarting from byte 0")
            start = have if resuming else 0
            length = resp.content_length
            expected_total = start + length if length is not None else None
            limit = self.settings.cache_max_bytes
            if expected_total is not None and expected_total > limit:
                raise ModelError(
                    f"{url}: artifact of {expected_total} bytes exceeds the cache budget ({limit})"
                )
            if resuming:
                stats.resumed_from.append(start)
                log.info("model_fetch_resume", url=url, offset=start)
            digest = await asyncio.to_thread(_hash_prefix, part, start)
            fh = await asyncio.to_thread(open, part, "r+b" if start else "wb")
            try:
                await asyncio.to_thread(fh.seek, start)
                written = start
                buf = bytearray()
                async for chunk in resp.content.iter_chunked(256 * 1024):
                    buf += chunk
                    if written + len(buf) > limit:
                        raise ModelError(f"{url}: artifact exceeds {limit} bytes")
                    if len(buf) >= _WRITE_CHUNK:
                        written += await asyncio.to_thread(_write_hash, fh, digest, bytes(buf))
                        buf.clear()
                if buf:
                    written += await asyncio.to_thread(_write_hash, fh, digest, bytes(buf))
                await asyncio.to_thread(_truncate_sync, fh, written)
            finally:
                await asyncio.to_thread(fh.close)
            if expected_total is not None and written != expected_total:
                raise _RetryError(f"short body: {written} of {expected_total} bytes")
            return str(digest.hexdigest())


def _range_starts_at(content_range: str | None, offset: int) -> bool:
    # "bytes 100-199/200"
    if not content_range or not content_range.startswith("bytes "):
        return False
    try:
        first = int(content_range[6:].split("-", 1)[0])
    except ValueError:
        return False
    return first == offset


async def _check_status(resp: aiohttp.ClientResponse, url: str) -> None:
    """Raise for anything but 200/206. The message is ours: a foreign body goes, truncated,
    into the log only (it could be anything, and the error text reaches the node's state)."""
    if resp.status in (200, 206):
        return
    try:
        body = (await resp.text(errors="replace"))[:_BODY_QUOTE]
    except (aiohttp.ClientError, asyncio.TimeoutError):
        body = ""
    log.warning("model_fetch_http_error", url=url[:200], status=resp.status, body=body)
    if resp.status in _RETRY_STATUSES:
        raise _RetryError(f"HTTP {resp.status}")
    if 300 <= resp.status < 400:
        raise ModelError(f"{url[:120]}: HTTP {resp.status}, a redirect (not followed)")
    if resp.status in (401, 403):
        raise ModelError(f"{url[:120]}: HTTP {resp.status}: the hub refused this node "
                         "(check hub.cert_file, or hub.token_file)")
    raise ModelError(f"{url[:120]}: HTTP {resp.status}")


def _size_or_zero(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _hash_prefix(path: Path, length: int) -> Any:
    digest = hashlib.sha256()
    if length:
        with path.open("rb") as fh:
            left = length
            while left:
                block = fh.read(min(left, _WRITE_CHUNK))
                if not block:
                    break
                digest.update(block)
                left -= len(block)
    return digest


def _write_hash(fh: Any, digest: Any, data: bytes) -> int:
    fh.write(data)
    digest.update(data)
    return len(data)


def _truncate_sync(fh: Any, size: int) -> None:
    fh.truncate(size)
    fh.flush()
