"""``GET /v1/stream``: change notices for the fleet page, as newline-delimited JSON.

Why a stream of its own: the page must learn that a rollout moved on or a node changed
version without polling every API route. ``EventSource`` cannot send the bearer token, so the
page reads this response with ``fetch`` and a streamed body; each line is one JSON object:

- ``{"type": "snapshot", "seq": N, "at": unix_s, "fleet": {...}, "rollouts": [...]}``:
  ``fleet`` holds the node count, how many are online, versions per model and a ``digest``
  that changes when a node's name, online flag, assigned or reported versions, model status or
  applied generation changes (not with every telemetry message); ``rollouts`` the summaries of
  the latest ``ROLLOUTS_SHOWN`` rollouts, as ``GET /v1/rollouts`` gives them. The page fetches
  details (``/v1/nodes``, ``/v1/rollouts/{id}``) from the REST API when these change.
- ``{"type": "ping", "at": unix_s}`` every ``PING_S`` while nothing changes;
- ``{"type": "bye", "reason": ...}`` before the hub ends the stream (``MAX_STREAM_S`` reached,
  or shutdown); the page reconnects.

Cost does not grow with the number of readers: one ``Watcher`` task (running only while a
stream is open) asks the control plane every ``INTERVAL_S`` and encodes one line, which every
reader shares (the interval grows so that looking takes at most a tenth of the time on a
large fleet). A snapshot goes out when it changed, and at least every ``ACTIVE_EVERY_S``
while a rollout is active (its bake clock and gate values move without an event). Bounds: at
most ``MAX_STREAMS`` open at once (one more is refused with 503 ``too_many_streams``); a
reader holds one reference to the newest line, never a queue (a slow reader skips to the
newest snapshot, and the skips are counted); a write that does not drain within
``WRITE_TIMEOUT_S`` ends the stream (and the connection guard's send timeout closes a socket
nobody reads). The caller needs a ``read`` token like every other read; without one: 401 JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import structlog
from aiohttp import web

from hub.api import ports
from hub.api.httputil import authorize, error_response
from hub.cluster.selectors import Selector
from hub.rollouts.model import TERMINAL_STATES

log = structlog.get_logger(__name__)

#: Streams open at once; one more is refused (503). A page holds one; 32 is a room of people.
MAX_STREAMS = 32
#: Seconds between two looks at the control plane (one look serves every reader).
INTERVAL_S = 1.0
#: While a rollout is active, a snapshot at least this often (bake clock, live gate values).
ACTIVE_EVERY_S = 2.0
#: Seconds of silence after which a ping is sent (below the proxies' usual 60 s idle cut).
PING_S = 15.0
#: Longest life of one stream, seconds; the page reconnects (a token revoked meanwhile then
#: stops it).
MAX_STREAM_S = 600.0
#: Seconds one write may wait for the client to take the bytes before the stream is ended.
WRITE_TIMEOUT_S = 10.0
#: A look at the control plane may take at most 1/LOOK_BUDGET of the time (the interval grows
#: on a fleet so large that one look takes more than INTERVAL_S / LOOK_BUDGET).
LOOK_BUDGET = 10
#: Seconds between two looks at whether a stream's client went away (its slot is then freed).
GONE_CHECK_S = 1.0
#: Rollout summaries in a snapshot (newest first).
ROLLOUTS_SHOWN = 20


def _fleet_summary(nodes: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts and a digest of what a person would call a change of the fleet."""
    versions: dict[str, dict[str, int]] = {}
    online = failed = 0
    h = hashlib.blake2b(digest_size=12)
    for n in nodes:
        online += bool(n.get("online"))
        reported = n.get("models") or {}
        for model, state in sorted(reported.items()):
            version = str(state.get("version") or "-")
            per = versions.setdefault(model, {})
            per[version] = per.get(version, 0) + 1
            failed += state.get("status") == "failed"
        h.update(orjson.dumps([
            n.get("name"), n.get("online"), n.get("assigned"),
            [(m, s.get("version"), s.get("status")) for m, s in sorted(reported.items())],
            (n.get("generation") or {}).get("applied"),
        ]))
    return {"nodes": len(nodes), "online": online, "failed_models": failed,
            "versions": versions, "digest": h.hexdigest()}


class Watcher:
    """Looks at the control plane while anyone listens; publishes the newest snapshot line."""

    def __init__(self, control: ports.FleetControl, *, interval_s: float = INTERVAL_S,
                 active_every_s: float = ACTIVE_EVERY_S, max_streams: int = MAX_STREAMS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.control = control
        self.interval_s, self.active_every_s = interval_s, active_every_s
        self.max_streams = max_streams
        self.clock = clock
        self.seq = 0
        self.line = b""
        self.readers = 0
        self.refused = 0
        self.closing = False
        self._key: bytes = b""
        self._published_at = 0.0
        self._event = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # ----------------------------------------------------------------- readers
    def join(self) -> bool:
        """Count a reader in (starting the look loop); False when the cap is reached."""
        if self.readers >= self.max_streams or self.closing:
            self.refused += 1
            return False
        self.readers += 1
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(),
                                                                 name="dashboard-watcher")
        return True

    def leave(self) -> None:
        """Count a reader out; the look loop stops with the last one."""
        self.readers -= 1
        if self.readers == 0 and self._task is not None:
            self._task.cancel()
            self._task = None

    async def wait(self, after: int, timeout: float) -> bool:
        """Wait until a snapshot newer than ``after`` is out (or closing); False on timeout."""
        while self.seq <= after and not self.closing:
            event = self._event
            try:
                await asyncio.wait_for(event.wait(), timeout)
            except asyncio.TimeoutError:
                return False
        return True

    async def aclose(self) -> None:
        """Wake every reader to say goodbye and stop the look loop (app shutdown)."""
        self.closing = True
        self._wake()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # ---------------------------------------------------------------- looking
    def _wake(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def look(self) -> None:
        """One look: publish a snapshot when it changed or a rollout is active and due."""
        nodes = self.control.nodes(Selector(()))
        rollouts = await self.control.rollouts(ROLLOUTS_SHOWN)
        fleet = _fleet_summary(nodes)
        key = orjson.dumps([fleet, rollouts])
        active = any(r.get("state") not in TERMINAL_STATES for r in rollouts)
        now = self.clock()
        due = active and now - self._published_at >= self.active_every_s
        if key == self._key and not due:
            return
        self._key, self._published_at = key, now
        self.seq += 1
        self.line = orjson.dumps({"type": "snapshot", "seq": self.seq, "at": time.time(),
                                  "fleet": fleet, "rollouts": rollouts}) + b"\n"
        self._wake()

    async def _run(self) -> None:
        while True:
            t0 = time.monotonic()
            try:
                await self.look()
            except asyncio.CancelledError:
                raise
            except Exception:
                # the next look may succeed (a database hiccup); readers keep the last one
                log.exception("dashboard_watch_failed")
            # a look at a large fleet costs (every node's view is built): never spend more
            # than 1/LOOK_BUDGET of the loop's time on it, whatever the interval says
            took = time.monotonic() - t0
            await asyncio.sleep(max(self.interval_s, took * LOOK_BUDGET))


WATCHER_KEY = web.AppKey("hub_dashboard_watcher", Watcher)


@dataclass
class _Tally:
    sent: int = 0
    skipped: int = 0
    reason: str = "client_gone"


async def _write(resp: web.StreamResponse, line: bytes) -> None:
    await asyncio.wait_for(resp.write(line), WRITE_TIMEOUT_S)


async def _pump(request: web.Request, resp: web.StreamResponse, watcher: Watcher,
                tally: _Tally) -> None:
    """Send snapshots (and pings) until the stream's life is over, the client left or the
    hub closes. aiohttp does not cancel a handler whose client went away, so the loop looks
    at the connection every ``GONE_CHECK_S`` and frees the slot within that."""
    start = last_write = time.monotonic()
    seen = 0
    while True:
        if request.transport is None or request.transport.is_closing():
            return
        now = time.monotonic()
        left = MAX_STREAM_S - (now - start)
        if watcher.closing or left <= 0:
            tally.reason = "shutdown" if watcher.closing else "max_age"
            await _write(resp, orjson.dumps({"type": "bye", "reason": tally.reason}) + b"\n")
            return
        if now - last_write >= PING_S:
            await _write(resp, orjson.dumps({"type": "ping", "at": time.time()}) + b"\n")
            last_write = now
        if await watcher.wait(seen, min(GONE_CHECK_S, left)) and not watcher.closing:
            tally.skipped += max(0, watcher.seq - seen - 1) if seen else 0
            seen = watcher.seq
            await _write(resp, watcher.line)
            tally.sent += 1
            last_write = time.monotonic()


async def stream(request: web.Request) -> web.StreamResponse:
    """``GET /v1/stream``: change notices until the hub ends the stream (module docstring)."""
    caller = authorize(request, "read")
    watcher = request.app[WATCHER_KEY]
    if not watcher.join():
        log.warning("dashboard_stream_refused", caller=caller.name, open=watcher.readers,
                    limit=watcher.max_streams, refused_total=watcher.refused)
        return error_response(503, "too_many_streams",
                              f"{watcher.readers} streams are open (at most "
                              f"{watcher.max_streams}); retry later", {"Retry-After": "5"})
    tally = _Tally()
    try:
        resp = web.StreamResponse(headers={
            "Content-Type": "application/x-ndjson; charset=utf-8",
            "Cache-Control": "no-store", "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        log.info("dashboard_stream_opened", caller=caller.name, open=watcher.readers)
        try:
            await _pump(request, resp, watcher, tally)
        except (ConnectionResetError, asyncio.TimeoutError) as exc:
            tally.reason = "write_timeout" if isinstance(exc, asyncio.TimeoutError) \
                else "client_gone"
        return resp
    finally:
        watcher.leave()
        log.info("dashboard_stream_closed", caller=caller.name, reason=tally.reason,
                 sent=tally.sent, skipped=tally.skipped, open=watcher.readers)
