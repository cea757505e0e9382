"""The broker ``kill -9``ed and restarted while 10,000 results flow through the outbox.

An independent subscriber (plain paho, clean session) records what arrives. After the restart
it resubscribes before the agent reconnects (the agent's minimum reconnect delay is 1 s; the
test checks the order rather than assuming it), as in a plant where consumers stay connected.

Choosing the instant of the kill: a broker sends PUBACK once it has *queued* a message, and
writes the message to subscribers in the same or a later loop iteration. A broker killed in
between loses a message it acknowledged; no publisher can prevent that, and a test that
allowed it would measure Mosquitto, not the agent. So the test freezes the broker (SIGSTOP)
while the agent has results in flight, lets the sockets settle, and kills it (SIGKILL) only if
everything the agent saw acknowledged has reached the subscriber and results are still in
flight (sent, not acknowledged: exactly what the agent must send again); otherwise it thaws
the broker and tries again a moment later.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson
import pytest

from edge_agent.config import MqttSettings, OutboxSettings
from edge_agent.outbox.facade import Outbox
from edge_agent.transport.drain import Drain
from edge_agent.transport.link import MqttLink
from tests.agent.outbox.test_outbox_faults import detection_result
from tests.support.broker import Broker
from tests.support.mqtt_recorder import Recorder
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.fault]

TOTAL = 10_000
WINDOW = 100
#: Results produced before the broker is killed (the rest during the outage), in chunks.
BEFORE_KILL = 3_000
CHUNK = 200


class AckRecordingLink(MqttLink):
    """The real link, also remembering the payloads the broker acknowledged (test only)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.acked: set[bytes] = set()
        self.acked_keys: set[tuple[str, int]] = set()
        self._acked_lock = threading.Lock()

    def publish(self, topic: str, payload: bytes, **kw: Any) -> bool:
        on_ack = kw.get("on_ack")
        if on_ack is not None:
            def recording(token: Any, reason: int, _p: bytes = payload) -> None:
                obj = orjson.loads(_p)
                if reason < 0x80 and "camera" in obj:  # results, not the offline state
                    with self._acked_lock:
                        self.acked.add(_p)
                        self.acked_keys.add((obj["camera"], obj["seq"]))
                on_ack(token, reason)
            kw["on_ack"] = recording
        return super().publish(topic, payload, **kw)

    def acked_copy(self) -> set[bytes]:
        with self._acked_lock:
            return set(self.acked)

    def acked_keys_copy(self) -> set[tuple[str, int]]:
        with self._acked_lock:
            return set(self.acked_keys)
CAMERAS = ("cam0", "cam1", "cam2")


async def test_broker_kill9_mid_stream_loses_nothing(
    own_broker: Broker, topic_prefix: str, tmp_path: Path
) -> None:
    """0 missing, duplicates <= the in-flight window, first arrivals in seq order per camera."""
    node = "node-bk"
    rec = Recorder(own_broker, [f"{topic_prefix}/+/results/+"]).start()
    outbox = await Outbox(OutboxSettings(path=tmp_path / "outbox.sqlite3", commit_interval_ms=20),
                          topic_prefix=topic_prefix).aopen()
    link = AckRecordingLink(MqttSettings(**own_broker.settings(node), topic_prefix=topic_prefix,
                                         max_inflight=WINDOW, reconnect_min_s=1.0,
                                         reconnect_max_s=2.0, keepalive_s=5), node)
    await link.start()
    drain = Drain(outbox, link)
    drain.start()
    published: dict[str, int] = defaultdict(int)

    def publish(start: int, stop: int) -> None:
        for i in range(start, stop):
            cam = CAMERAS[i % len(CAMERAS)]
            outbox.publish(detection_result(node, cam, i))
            published[cam] += 1

    try:
        assert await link.wait_connected(10)
        n = 0
        in_flight_at_kill = 0
        while not in_flight_at_kill:
            assert n < TOTAL // 2, "found no instant to kill the broker at"
            def caught_up(sent: int = n) -> bool:
                return rec.count() >= sent
            await asyncio.to_thread(rec.wait, caught_up, 30, "the subscriber to keep up")
            publish(n, n + CHUNK)
            n += CHUNK
            if n >= BEFORE_KILL:
                in_flight_at_kill = await asyncio.to_thread(_kill_mid_flight, own_broker,
                                                            link, drain, rec)
        publish(n, TOTAL)  # accepted while the broker is gone
        # everything the dead broker acknowledged (no ack can come after the disconnect)
        await asyncio.to_thread(wait_until, lambda: link.stats.disconnects == 1, 10,
                                "the agent to notice")
        acked_by_old = link.acked_keys_copy()
        assert await outbox.aflush()
        own_broker.start()
        await asyncio.to_thread(rec.wait, lambda: rec.subscribed_count >= 2, 20,
                                "the subscriber back")
        assert link.stats.connects == 1, "the agent reconnected before the subscriber did"
        await asyncio.to_thread(rec.wait, lambda: rec.distinct() >= TOTAL, 60, "all results")
        assert link.stats.connects == 2
    finally:
        await drain.aclose()
        await link.aclose()
        await outbox.aclose()
        rec.stop()

    results = rec.results()
    received = [(str(r["camera"]), int(r["seq"])) for r in results]  # type: ignore[call-overload]
    # a camera's committed results are numbered without holes from its series' first seq
    firsts = {str(r["camera"]): int(r["seq_reset"]["first"])  # type: ignore[index]
              for r in results if "seq_reset" in r}
    expected = {(cam, firsts[cam] + k) for cam, n in published.items() for k in range(n)}
    missing = expected - set(received)
    lost_by_broker = {m for m in missing if m in acked_by_old}
    assert not missing - lost_by_broker, (
        f"{len(missing - lost_by_broker)} results the broker never acknowledged are missing")
    assert not lost_by_broker, (
        f"the killed broker lost {len(lost_by_broker)} results it had acknowledged")
    dups = len(received) - len(set(received))
    assert dups <= WINDOW, f"{dups} duplicates, more than the in-flight window {WINDOW}"
    seen: dict[str, set[int]] = defaultdict(set)
    high: dict[str, int] = {}
    for cam, seq in received:
        if seq < high.get(cam, -1):
            assert seq in seen[cam], f"{cam} seq {seq} arrived first after {high[cam]}"
        seen[cam].add(seq)
        high[cam] = max(high.get(cam, -1), seq)
    print(f"in flight at the kill: {in_flight_at_kill}, duplicates: {dups}")


def _rx_queue(sock: Any) -> int:
    """Bytes the kernel holds for ``sock`` that its owner has not read yet (/proc/net/tcp)."""
    port = sock.getsockname()[1]
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port:
            return int(fields[4].split(":")[1], 16)
    return 0


def _kill_mid_flight(broker: Broker, link: AckRecordingLink, drain: Drain,
                     rec: Recorder) -> int:
    """SIGKILL the broker at an instant it owes no subscriber an acknowledged message.

    Returns the results in flight at the kill, or 0 (broker thawed) to try again later.
    """
    assert broker.proc is not None
    try:
        wait_until(lambda: drain.inflight > 0, 5, "results in flight")
    except AssertionError:
        return 0
    os.kill(broker.proc.pid, signal.SIGSTOP)
    socks = [link.socket(), rec.socket()]
    try:
        # frozen: only what is already in the sockets still moves; let both readers empty
        # their receive queues, then compare what the broker acknowledged with what arrived
        wait_until(lambda: all(s is not None and _rx_queue(s) == 0 for s in socks), 2,
                   "sockets read")
        wait_until(lambda: rec.has_all(link.acked_copy()), 2, "acked results delivered")
    except AssertionError:
        os.kill(broker.proc.pid, signal.SIGCONT)
        return 0
    inflight = drain.inflight
    if inflight == 0:
        os.kill(broker.proc.pid, signal.SIGCONT)
        return 0
    broker.kill()
    return inflight
