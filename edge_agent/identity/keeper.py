"""Keeps this node's certificate valid: asked of the hub at start, renewed before it ends.

Why the agent does this itself: on K3s nobody can hand a DaemonSet pod a per-node certificate
in advance, and a shared one is what the trust model forbids. The pod can prove where it runs:
its projected ServiceAccount token (audience ``edge-hub``, kept fresh by the kubelet) goes to
the hub with a CSR for a new key, and the hub signs for the node the API server says the pod
is on (``hub/pki/bootstrap.py``). The token goes to the hub's origin (``hub.url``) only, never
follows a redirect, and is never logged.

At start (``ensure``) a certificate on disk that is this node's, matches its key and is not
yet due is used as it is; one that is due but still valid is used when the hub cannot be
reached; without a usable one the agent waits for the hub, retrying with backoff, because
without it the broker will not let it speak. While running (``run``, task ``identity``) the
certificate is renewed when ``identity.renew_at`` of its life has passed (less a small jitter,
so a fleet bootstrapped together does not renew in lockstep), failures retried with the shared
backoff; after each renewal ``on_renewed`` is awaited: the MQTT link reconnects with the new
certificate while results wait in the outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import structlog

from edge_agent.common import backoff
from edge_agent.common import settings as common_settings
from edge_agent.config import AgentSettings
from edge_agent.contract import protocol
from edge_agent.identity import files

log = structlog.get_logger(__name__)

#: Largest answer read from the hub, bytes (a certificate and the CA are about 2 KB).
MAX_ANSWER_BYTES = 64 * 1024
#: The renewal point moves earlier by up to this fraction of ``renew_at`` (fleet jitter).
JITTER = 0.05
#: Longest single wait of the renewal loop, seconds: the schedule is looked at again at least
#: this often (a clock that jumped, a certificate replaced by hand).
MAX_WAIT_S = 3600.0
#: Shortest wait after a renewal before the next, seconds: a hub whose clock runs far ahead
#: of ours could hand out certificates that look due on arrival; this keeps that from
#: becoming a loop of requests (it is logged).
MIN_GAP_S = 60.0
#: Longest foreign error text quoted in a log line or error.
_QUOTE = 200

Sleep = Callable[[float], Awaitable[Any]]


class IdentityError(Exception):
    """No certificate this time; the message says why (never with the token)."""


class RefusedError(IdentityError):
    """The hub answered and refused (4xx): the pod, token or node did not check out."""


class UnavailableError(IdentityError):
    """No usable answer: the hub is unreachable, busy (429), failing (5xx), or answered
    something that is not a certificate for this node's new key."""


@dataclass
class IdentityStats:
    """Requests made and certificates taken (one writer: the keeper)."""

    requests: int = 0
    issued: int = 0
    failures: int = 0


class IdentityKeeper:
    """The node's certificate in ``mqtt.cert_file``/``mqtt.key_file``, kept valid."""

    def __init__(self, settings: AgentSettings, *,
                 on_renewed: Callable[[], Awaitable[None]] | None = None,
                 clock: Callable[[], float] = time.time, sleep: Sleep = asyncio.sleep,
                 rand: backoff.Rand = random.random) -> None:
        m, s = settings.mqtt, settings.identity
        if settings.hub.url is None or m.cert_file is None or m.key_file is None:
            raise ValueError("identity.bootstrap needs hub.url, mqtt.cert_file, mqtt.key_file")
        self.settings = s
        self.node = settings.node
        self.url = settings.hub.url.rstrip("/") + protocol.BOOTSTRAP_PATH
        self.ca_file = settings.hub.ca_file
        self.cert_file, self.key_file = m.cert_file, m.key_file
        self.secret_policy = settings.secret_files
        self.on_renewed = on_renewed
        self.stats = IdentityStats()
        #: The certificate in use, once there is one.
        self.held: files.Held | None = None
        self._due = 0.0
        self._clock, self._sleep, self._rand = clock, sleep, rand
        self._backoff = backoff.Backoff(s.retry_min_s, s.retry_max_s, rand)
        self._wake = asyncio.Event()

    @property
    def due(self) -> float:
        """When the held certificate is to be renewed (UNIX time; 0 when none is held)."""
        return self._due

    def _take(self, held: files.Held) -> None:
        self.held = held
        self._due = held.due(self.settings.renew_at * (1 - JITTER * self._rand()))

    # ------------------------------------------------------------------------------ start
    async def ensure(self) -> files.Held:
        """A usable certificate on disk before the MQTT link starts (see the module doc)."""
        held = await asyncio.to_thread(files.Held.load, self.cert_file, self.key_file)
        now = self._clock()
        if held is not None and held.node == self.node and held.not_after > now:
            self._take(held)
            if now < self._due:
                log.info("identity_loaded", serial=f"{held.serial:x}",
                         not_after=files.utc(held.not_after), renew_at=files.utc(self._due))
                return held
            try:
                return await self.renew()
            except IdentityError as exc:
                log.warning("identity_renewal_failed", error=str(exc), attempt=1,
                            expires_in_s=round(held.expires_in(now)))
                return held  # still valid: run() keeps trying
        if held is not None:
            log.info("identity_unusable", node=held.node, expired=held.not_after <= now)
        while True:
            try:
                return await self.renew()
            except IdentityError as exc:
                delay = self._backoff.next_delay()
                log.warning("identity_bootstrap_failed", error=str(exc),
                            attempt=self._backoff.attempt, retry_in_s=round(delay, 2))
                await self._sleep(delay)

    # ---------------------------------------------------------------------------- renewal
    async def run(self) -> None:
        """Renew at each certificate's due time, forever (the supervisor's ``identity``)."""
        while True:
            wait = self._due - self._clock()
            if wait > 0:
                await self._wait(min(wait, MAX_WAIT_S))
                continue
            try:
                await self.renew()
            except IdentityError as exc:
                delay = self._backoff.next_delay()
                left = self.held.expires_in(self._clock()) if self.held else 0.0
                (log.error if left <= 0 else log.warning)(
                    "identity_renewal_failed", error=str(exc), attempt=self._backoff.attempt,
                    retry_in_s=round(delay, 2), expires_in_s=round(left))
                await self._wait(delay)
                continue
            if self.on_renewed is not None:
                try:
                    await self.on_renewed()
                except Exception:  # the files are in place: the next connection uses them
                    log.exception("identity_switch_failed")

    def renew_now(self) -> None:
        """Renew at once instead of at the due time (tests, an operator's request)."""
        self._due = 0.0
        self._wake.set()

    async def _wait(self, seconds: float) -> None:
        """Sleep ``seconds`` (the injected sleep) or until ``renew_now``."""
        self._wake.clear()
        sleeper = asyncio.ensure_future(self._sleep(seconds))
        waker = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (sleeper, waker):
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t

    async def renew(self) -> files.Held:
        """One request to the hub with a new key; on success the files are replaced."""
        key = files.new_key()
        try:
            token = await asyncio.to_thread(common_settings.read_secret,
                                            self.settings.token_file, self.secret_policy)
        except OSError as exc:
            raise UnavailableError(f"cannot read identity.token_file "
                                   f"{self.settings.token_file}: {exc.strerror}") from exc
        self.stats.requests += 1
        try:
            cert_pem = await self._ask(token, files.csr_pem(key, self.node))
            held = files.check_grant(cert_pem, key, self.node, self._clock())
        except ValueError as exc:
            self.stats.failures += 1
            raise UnavailableError(f"the hub's answer is unusable: {exc}") from exc
        except IdentityError:
            self.stats.failures += 1
            raise
        await asyncio.to_thread(files.store, self.cert_file, self.key_file, cert_pem, key)
        self._take(held)
        now = self._clock()
        if self._due < now + MIN_GAP_S:
            log.warning("identity_due_on_arrival", not_before=files.utc(held.not_before),
                        not_after=files.utc(held.not_after), hint="check the clocks")
            self._due = now + MIN_GAP_S
        self._backoff.reset()
        self.stats.issued += 1
        log.info("identity_issued", serial=f"{held.serial:x}",
                 not_after=files.utc(held.not_after), renew_at=files.utc(self._due))
        return held

    # ------------------------------------------------------------------------------- HTTP
    def _ssl(self) -> ssl.SSLContext | bool:
        if not self.url.startswith("https:"):
            return False
        try:
            ctx = ssl.create_default_context(
                cafile=None if self.ca_file is None else str(self.ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise UnavailableError(f"hub.ca_file {self.ca_file} cannot be used: {exc}") from exc
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    async def _ask(self, token: str, csr: str) -> bytes:
        """POST the CSR with the token; the certificate's PEM, or an ``IdentityError``."""
        tls = await asyncio.to_thread(self._ssl)
        timeout = aiohttp.ClientTimeout(total=self.settings.timeout_s)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session, session.post(
                    self.url, json={"node": self.node, "csr": csr}, ssl=tls,
                    headers={"Authorization": f"Bearer {token}"},
                    allow_redirects=False) as resp:
                status = resp.status
                body = bytearray()
                async for chunk in resp.content.iter_chunked(16 * 1024):
                    body += chunk
                    if len(body) > MAX_ANSWER_BYTES:
                        raise UnavailableError(f"{self.url}: answer over {MAX_ANSWER_BYTES} "
                                               "bytes")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise UnavailableError(f"{self.url}: {type(exc).__name__}: "
                                   f"{str(exc)[:_QUOTE]}") from exc
        if status == 200:
            try:
                pem = orjson.loads(body)["certificate"]
            except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
                raise UnavailableError(f"{self.url}: answer without a certificate") from exc
            if not isinstance(pem, str):
                raise UnavailableError(f"{self.url}: answer without a certificate")
            return pem.encode()
        reason = _error_message(body)
        if status == 429 or status >= 500 or status < 400:
            raise UnavailableError(f"{self.url}: HTTP {status}: {reason}")
        raise RefusedError(f"{self.url}: HTTP {status}: {reason}")


def _error_message(body: bytes | bytearray) -> str:
    """The hub's JSON error message, truncated (foreign text is quoted, never trusted)."""
    try:
        msg = orjson.loads(body)["error"]["message"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        msg = body[:_QUOTE].decode("utf-8", "replace")
    return str(msg)[:_QUOTE]
