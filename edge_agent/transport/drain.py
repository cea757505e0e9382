"""Moves committed outbox rows to MQTT at QoS 1 and deletes them on PUBACK.

Why a thread and not a coroutine: at broker speed (~10,000 messages/s) the per-message work
(SQLite reads, paho's packet building, the ack bookkeeping) would take a large share of the
event loop on a 2-core box. The drain therefore runs in its own thread, and ``run()`` is the
coroutine the supervisor owns (task ``outbox-drain``): it ends when the thread does.

Order and duplicates: rows are sent in id order (per camera, that is seq order) over the one
connection, with at most ``window`` unacknowledged at a time. When the link drops, paho resends
exactly those in-flight messages, in order, right after the next CONNACK; so a broker crash
duplicates at most ``window`` results. paho lets another thread publish between our connect
callback and that resend, which would overtake the resent messages; so after a reconnect the
drain sends nothing new until every message of the previous connection is acknowledged (one
round trip). The first arrival of every result is thus in seq order. A new process sends every
row not yet acknowledged, from the oldest.

Counters have one writer each: the drain thread counts what it handed to paho, paho's thread
what the broker answered (acked, refused, deferred); in flight is the difference.

A clean stop (``aclose``) stops claiming, then waits for every message already handed to paho
to be answered, so the outbox (closed after the drain and the link) deletes every row the
broker acknowledged: after a SIGTERM the file holds no acknowledged row, and the next start
sends nothing twice. The check that claiming is on and the count of what is handed to paho
happen under one lock, so no message can slip out after ``aclose`` decided that nothing is in
flight (it did: the broker acknowledged it, the process exited before the PUBACK was read,
and the row was sent again by the next start).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import time
from typing import Any

import structlog

from edge_agent.outbox.facade import Outbox, Row
from edge_agent.transport.link import MqttLink

log = structlog.get_logger(__name__)

#: Rows read from SQLite per claim (the claimed rows are protected from drops).
PAGE = 500
#: Seconds between log lines about broker-refused messages.
LOG_INTERVAL_S = 10.0
#: PUBACK reason codes that no retry can fix (not authorized, topic name invalid, packet too
#: large, payload format invalid): the row is dropped, counted as ``broker_rejected``.
PERMANENT_REFUSALS = frozenset({0x87, 0x90, 0x95, 0x99})


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Drain:
    """The outbox-to-MQTT pump. ``start()`` or ``await run()``; ``await aclose()``."""

    def __init__(self, outbox: Outbox, link: MqttLink, *, window: int | None = None) -> None:
        self.outbox = outbox
        self.link = link
        #: Messages handed to paho and not yet acknowledged. paho keeps at most
        #: ``max_inflight`` of them on the wire and sends the next one from its own thread as
        #: each PUBACK arrives (as bare paho does); the rest wait in its memory (claimed rows,
        #: so never dropped). Default 4 x ``max_inflight``: the wire never waits for us.
        self.window = window if window is not None else 4 * link.settings.max_inflight
        self._cond = threading.Condition()
        #: Messages handed to paho since start (the drain thread writes it, under ``_cond``).
        self._sent = 0
        self._stop = False
        self._claiming = True
        self._thread: threading.Thread | None = None
        self._done: asyncio.Future[None] | None = None
        self._buf: collections.deque[Row] = collections.deque()
        self._gen = 0  # the link generation our in-flight messages were sent on
        self._wake_at = 0  # the pump resumes when in-flight falls to this
        self._rejected_logged = 0.0
        #: Messages acknowledged by the broker / refused for good (dropped) / refused for now
        #: (kept in the file for the next process) since start. Written by paho's thread
        #: only (``_on_ack``), under ``_cond``: in flight = ``_sent`` less these three.
        self.acked = 0
        self.refused = 0
        self.deferred = 0
        #: The replay rate, written by the drain thread only (``_update_rate``).
        self._rate = 0.0
        self._rate_at = time.monotonic()
        self._rate_count = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the drain thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name="outbox-drain", daemon=True)
            self._thread.start()

    async def run(self) -> None:
        """Run until ``aclose``; the supervisor's ``outbox-drain`` task."""
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        done = self._done
        self.start()
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            await self.aclose(0.0)
            raise

    async def aclose(self, timeout: float = 5.0) -> None:
        """Stop claiming, wait up to ``timeout`` for in-flight acks, stop the thread."""
        with self._cond:
            self._claiming = False
            self._cond.notify_all()
        await asyncio.to_thread(self.wait_idle, timeout)
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        thread = self._thread
        if thread is not None:
            await asyncio.to_thread(thread.join, 5.0)
            self._thread = None

    def wait_idle(self, timeout: float) -> bool:
        """Block until nothing is in flight (or ``timeout``); True when idle."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._inflight() > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def wait_acked(self, count: int, timeout: float) -> bool:
        """Block until ``count`` messages were acknowledged since start (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.acked < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    # ------------------------------------------------------------------ observation

    @property
    def inflight(self) -> int:
        """Messages sent and not yet acknowledged."""
        with self._cond:
            return self._inflight()

    def _inflight(self) -> int:
        """Under ``_cond``: messages handed to paho and not yet answered by a PUBACK."""
        return self._sent - self.acked - self.refused - self.deferred

    def rate(self) -> float:
        """Acknowledged messages per second over the last few seconds."""
        return self._rate

    def _update_rate(self) -> None:
        """On the drain thread (at least every 0.5 s while it runs): fold in the new acks."""
        now = time.monotonic()
        dt = now - self._rate_at
        if dt >= 1.0:
            n = self.acked - self._rate_count
            # exponentially weighted, ~5 s memory
            alpha = min(1.0, dt / 5.0)
            self._rate += alpha * (n / dt - self._rate)
            self._rate_at, self._rate_count = now, self.acked

    # ------------------------------------------------------------------ thread

    def _main(self) -> None:
        try:
            self._pump()
        except Exception:
            log.exception("outbox_drain_failed")
            raise
        finally:
            self._finish()

    def _finish(self) -> None:
        done = self._done
        if done is not None:
            loop = done.get_loop()
            if not loop.is_closed():
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_resolve, done)

    def _pump(self) -> None:
        link, buf = self.link, self._buf
        while True:
            free = self._wait_for_room()
            if free is None:
                return
            if not link.connected:
                link.wait_connected_sync(0.5)
                continue
            if not buf:
                buf.extend(self.outbox.claim(PAGE, timeout=0.5))
                if not buf:
                    continue
            outcome = self._send(min(free, len(buf)))
            if outcome == "resend":
                # paho is resending the previous connection's messages: let them land
                with self._cond:
                    if self._inflight() > 0:
                        self._cond.wait(0.5)
            elif outcome == "not_queued":
                link.wait_connected_sync(0.1)

    def _wait_for_room(self) -> int | None:
        """Wait until the window has room and claiming is on: the free slots (None: stop)."""
        with self._cond:
            window = max(1, min(self.window, 4 * self.link.receive_maximum))
            # wake in batches, not per PUBACK: a thread switch per message would cost
            # more than the message (see docs/outbox.md, figures)
            self._wake_at = window - max(1, window // 2)
            while (self._inflight() > self._wake_at or not self._claiming) and not self._stop:
                self._update_rate()
                self._cond.wait(0.5)
            if self._stop:
                return None
            self._update_rate()
            return window - self._inflight()

    def _send(self, n: int) -> str:
        """Publish up to ``n`` rows from the buffer: ``sent``, ``not_queued``, ``resend`` or
        ``stopped`` (``aclose`` stopped claiming: nothing more goes out)."""
        link, buf = self.link, self._buf
        with link.send_lock:
            if link.generation != self._gen:
                with self._cond:
                    if self._inflight() > 0:
                        return "resend"
                self._gen = link.generation
            with self._cond:
                if not self._claiming:
                    return "stopped"
                self._sent += n
            for sent in range(n):
                rid, topic, payload = buf[0]
                token = (rid, len(topic) + len(payload))
                try:
                    queued = link.publish(topic, payload, qos=1, on_ack=self._on_ack,
                                          token=token)
                except ValueError as exc:
                    # paho can never send it (e.g. larger than MQTT allows): drop, counted
                    buf.popleft()
                    self._unsent(1)
                    self.outbox.reject(rid, token[1], "invalid")
                    log.error("outbox_row_unsendable", id=rid, error=str(exc)[:200])
                    continue
                if not queued:
                    self._unsent(n - sent)
                    return "not_queued"
                buf.popleft()
        return "sent"

    def _unsent(self, n: int) -> None:
        """The drain thread: ``n`` messages counted as sent never reached paho."""
        with self._cond:
            self._sent -= n
            self._wake_if_room()

    def _wake_if_room(self) -> None:
        """Under ``_cond``: wake the pump once in-flight fell to its wake mark (or to 0)."""
        inflight = self._inflight()
        if inflight <= self._wake_at or inflight == 0:
            self._cond.notify_all()

    def _on_ack(self, token: Any, reason: int) -> None:
        """PUBACK (paho's thread): delete the row; or drop it, or keep it, if refused."""
        rid, size = token
        permanent = reason in PERMANENT_REFUSALS
        if reason < 0x80:
            self.outbox.ack(rid, size)
        elif permanent:
            self.outbox.reject(rid, size, "broker_rejected")
        # otherwise (e.g. quota exceeded) not this message's fault: it stays in the file and
        # the next process sends it again (counted, logged)
        with self._cond:
            if reason < 0x80:
                self.acked += 1
            elif permanent:
                self.refused += 1
            else:
                self.deferred += 1
            self._wake_if_room()
        if reason >= 0x80:
            self._log_refusal(reason, dropped=permanent)

    def _log_refusal(self, reason: int, *, dropped: bool) -> None:
        now = time.monotonic()
        if now - self._rejected_logged >= LOG_INTERVAL_S:
            self._rejected_logged = now
            log.error("outbox_broker_refused", reason_code=reason, dropped=dropped,
                      refused=self.refused, deferred=self.deferred)
