"""The events consumer and ``edge-hub events tail`` against the real broker: duplicates dropped,
gaps and resets reported, label and zone filters applied after de-duplication (a filtered event
still closes a gap), retained zone occupancy delivered, malformed payloads counted and skipped."""

from __future__ import annotations

import base64
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import orjson
import pytest

from edge_agent.contract import events as contract
from edge_agent.contract import snapshots as snaps
from hub.client.events import Event, EventSubscriber, Item, Occupancy, Snapshot
from hub.client.seqs import Gap, Reset
from hub.client.stream import BrokerUnavailableError
from tests.support.broker import CONSUMER, Broker, Publishers, free_port
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[3]
T0 = 1_700_000_000.0


def event(node: str, camera: str, seq: int, *, type: str = "update", track: int = 7,
          label: str = "person", zones: tuple[str, ...] = (), in_zones: tuple[str, ...] = (),
          reason: str | None = None, **extra: Any) -> bytes:
    """An event payload as an agent sends it (``contract.build_event`` plus the seq)."""
    ts = T0 + seq
    summary = {
        "track": track, "label": label, "first_seen": T0, "last_seen": ts, "frames": 10,
        "score": 0.8, "box": [0.1, 0.2, 0.3, 0.4],
        "best": {"score": 0.9, "box": [0.1, 0.2, 0.3, 0.4], "ts": T0},
        "model": {"name": "det", "version": "1.0.0"}, "in_zones": list(in_zones),
        "zones": [{"zone": z, "entered": T0, "left": None if z in in_zones else ts,
                   "dwell_s": seq} for z in zones],
        "crossings": [{"line": "gate", "ts": T0 + 1, "direction": "left_to_right"}],
    }
    msg = contract.build_event(node=node, camera=camera, type=type, ts=ts, track=summary,
                               reason=reason)
    msg["seq"] = seq
    msg.update(extra)
    return orjson.dumps(msg)


def occupancy(node: str, camera: str, zone: str, **labels: int) -> bytes:
    """A retained zone occupancy payload."""
    return orjson.dumps(contract.build_zone(node=node, camera=camera, zone=zone, ts=T0,
                                            labels=labels))


@pytest.fixture
def publisher(broker: Broker) -> Iterator[Publishers]:
    """Publishes as the node each topic names (the agents' own certificates)."""
    p = Publishers(broker)
    yield p
    p.close()


def subscriber(broker: Broker, **kw: Any) -> EventSubscriber:
    """An events subscriber logged in as the tests' consumer identity."""
    return EventSubscriber(**broker.settings(CONSUMER), **kw)


def collect(sub: EventSubscriber, received: int, timeout: float = 10.0) -> list[Item]:
    """Take items until the subscriber has processed ``received`` messages in all."""
    out: list[Item] = []

    def enough() -> bool:
        r = sub.get(timeout=0.05)
        if r is not None:
            out.append(r)
        return sub.stats.received >= received

    wait_until(enough, timeout, f"{received} messages processed")
    while (r := sub.get(timeout=0)) is not None:
        out.append(r)
    return out


def events_of(items: list[Item]) -> list[contract.EventMessage]:
    return [i.message for i in items if isinstance(i, Event)]


def test_duplicates_dropped_gaps_reported_late_delivered(
    broker: Broker, publisher: Publishers, topic_prefix: str
) -> None:
    gaps: list[Gap] = []
    t = contract.events_topic(topic_prefix, "n1", "cam-a")
    with subscriber(broker, topic_prefix=topic_prefix, on_gap=gaps.append) as sub:
        seqs = [0, 1, 1, 2, 5, 0, 3, 3]
        for s in seqs:
            publisher.publish(t, event("n1", "cam-a", s, type="new" if s == 0 else "update"))
        got = collect(sub, len(seqs))
    assert [e.seq for e in events_of(got)] == [0, 1, 2, 5, 3]
    assert [isinstance(i, Event) and i.late for i in got] == [False] * 4 + [True]
    assert gaps == [Gap("n1", "cam-a", 3, 4)]
    st = sub.stats
    assert (st.duplicates, st.gaps, st.missing, st.late, st.delivered) == (3, 1, 2, 1, 5)
    first = got[0]
    assert isinstance(first, Event) and first.key == ("n1", "cam-a", 0)
    assert first.message.type == "new" and first.message.crossings[0].direction == \
        "left_to_right"


def test_a_seq_reset_marker_starts_a_new_series_not_a_gap(
    broker: Broker, publisher: Publishers, topic_prefix: str
) -> None:
    gaps: list[Gap] = []
    resets: list[Reset] = []
    t = contract.events_topic(topic_prefix, "n1", "a")
    with subscriber(broker, topic_prefix=topic_prefix, on_gap=gaps.append,
                    on_reset=resets.append) as sub:
        publisher.publish(t, event("n1", "a", 10))
        publisher.publish(t, event("n1", "a", 11))
        # a new process closes the track the crashed one left open, in a new series
        publisher.publish(t, event("n1", "a", 9000, type="end", reason="restart",
                                   seq_reset={"first": 9000, "reason": "new_outbox"}))
        got = collect(sub, 3)
    assert [e.seq for e in events_of(got)] == [10, 11, 9000]
    last = got[-1]
    assert isinstance(last, Event) and last.reset and last.message.reason == "restart"
    assert resets == [Reset("n1", "a", 9000, 9000, 11, "new_outbox")]
    assert gaps == []


def test_label_and_zone_filters_apply_after_deduplication(
    broker: Broker, publisher: Publishers, topic_prefix: str
) -> None:
    gaps: list[Gap] = []
    t = contract.events_topic(topic_prefix, "n1", "dock")
    with subscriber(broker, topic_prefix=topic_prefix, label="person", zone="loading",
                    on_gap=gaps.append) as sub:
        publisher.publish(t, event("n1", "dock", 0, zones=("loading",), in_zones=("loading",)))
        publisher.publish(t, event("n1", "dock", 1, label="car", track=8, zones=("loading",)))
        publisher.publish(t, event("n1", "dock", 2, zones=("aisle",), in_zones=("aisle",)))
        # left the zone: still about it (the visit is in the track's history)
        publisher.publish(t, event("n1", "dock", 3, type="end", reason="lost",
                                   zones=("loading",)))
        publisher.publish(t, event("n1", "dock", 3, type="end", reason="lost",
                                   zones=("loading",)))
        got = collect(sub, 5)
    assert [(e.seq, e.type) for e in events_of(got)] == [(0, "update"), (3, "end")]
    # seqs 1 and 2 were filtered out, not lost
    assert gaps == []
    assert (sub.stats.filtered, sub.stats.duplicates, sub.stats.delivered) == (2, 1, 2)


def test_zone_occupancy_is_delivered_retained_and_filtered_by_zone(
    broker: Broker, publisher: Publishers, topic_prefix: str
) -> None:
    z = contract.zone_topic(topic_prefix, "n1", "dock", "loading")
    publisher.publish(z, occupancy("n1", "dock", "loading", person=2, car=1), retain=True)
    publisher.publish(contract.zone_topic(topic_prefix, "n1", "dock", "aisle"),
                      occupancy("n1", "dock", "aisle", person=1), retain=True)
    try:
        with subscriber(broker, topic_prefix=topic_prefix, occupancy=True,
                        zone="loading") as sub:
            got = collect(sub, 1)
            publisher.publish(z, occupancy("n1", "dock", "loading", person=1))
            got += collect(sub, 2)
        assert len(sub.filters) == 2
        occ = [i for i in got if isinstance(i, Occupancy)]
        assert [(o.message.count, o.message.labels, o.retained) for o in occ] == [
            (3, {"car": 1, "person": 2}, True), (1, {"person": 1}, False)]
    finally:  # retained messages outlive the test: clear them
        for zone in ("loading", "aisle"):
            publisher.publish(contract.zone_topic(topic_prefix, "n1", "dock", zone), b"",
                              retain=True)


def test_malformed_events_are_counted_and_skipped(
    broker: Broker, publisher: Publishers, topic_prefix: str
) -> None:
    t = contract.events_topic(topic_prefix, "n1", "a")
    with subscriber(broker, topic_prefix=topic_prefix) as sub:
        publisher.publish(t, b"not json")
        publisher.publish(t, orjson.dumps({**orjson.loads(event("n1", "a", 0)),
                                           "type": "moved"}))       # unknown type
        publisher.publish(t, event("n1", "other", 1))                  # names another camera
        publisher.publish(t, event("n1", "a", 2))
        got = collect(sub, 4)
    assert [e.seq for e in events_of(got)] == [2]
    assert sub.stats.malformed == 3


def test_bad_zone_name_and_unreachable_broker_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="zone"):
        EventSubscriber(zone="a/b")
    sub = EventSubscriber(port=free_port(), tls=False)
    with pytest.raises(BrokerUnavailableError):
        sub.start(timeout=1.0)


# --------------------------------------------------------------------------------- the CLI


def _cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "hub", "events", "tail", *args],
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )


def _subscribed(proc: subprocess.Popen[str]) -> str:
    """Read stderr until the CLI says it subscribed (it prints that once the broker agreed)."""
    assert proc.stderr is not None
    seen = ""
    for line in proc.stderr:
        seen += line
        if line.startswith("subscribed: "):
            return seen
    raise AssertionError(f"the CLI ended before subscribing: {seen}")


def test_cli_tail_filters_and_writes_json_lines(
    broker: Broker, publisher: Publishers, topic_prefix: str, tmp_path: Path
) -> None:
    out = tmp_path / "events.jsonl"
    proc = _cli(*broker.cli_args(), "--prefix", topic_prefix, "--node", "n1", "--label",
                "person", "--output", str(out), "--count", "3", "--timeout", "30")
    try:
        head = _subscribed(proc)
        t = contract.events_topic(topic_prefix, "n1", "a")
        publisher.publish(t, event("n1", "a", 0, type="new"))
        publisher.publish(t, event("n1", "a", 0, type="new"))             # duplicate
        publisher.publish(t, event("n1", "a", 1, label="car", track=9))   # filtered
        publisher.publish(contract.events_topic(topic_prefix, "n2", "a"),
                          event("n2", "a", 0))                             # other node
        publisher.publish(t, event("n1", "a", 4))                         # gap 2..3
        publisher.publish(t, event("n1", "a", 5, type="end", reason="lost"))
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    lines = [orjson.loads(x) for x in out.read_text().splitlines()]
    assert [(m["seq"], m["type"]) for m in lines] == [(0, "new"), (4, "update"), (5, "end")]
    assert lines[2]["reason"] == "lost" and stdout == ""
    assert "gap: n1/a seq 2..3 (2 missing)" in stderr
    summary = orjson.loads(stderr.split("summary: ")[1].splitlines()[0])
    assert (summary["delivered"], summary["duplicates"], summary["filtered"]) == (3, 1, 1)
    assert "events/" in head


def test_cli_tail_prints_a_line_per_event_and_occupancy(
    broker: Broker, publisher: Publishers, topic_prefix: str
) -> None:
    proc = _cli(*broker.cli_args(), "--prefix", topic_prefix, "--occupancy", "--zone",
                "loading", "--count", "2", "--timeout", "30")
    try:
        _subscribed(proc)
        publisher.publish(contract.events_topic(topic_prefix, "n1", "a"),
                          event("n1", "a", 0, type="new", zones=("loading",),
                                in_zones=("loading",)))
        publisher.publish(contract.zone_topic(topic_prefix, "n1", "a", "loading"),
                          occupancy("n1", "a", "loading", person=1))
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert stdout.splitlines() == [
        "n1/a seq=0 new track=7 label=person score=0.80 best=0.90 zones=loading age=0.0s "
        "frames=10 crossed=gate:left_to_right",
        "n1/a zone=loading count=1 person=1",
    ]


def test_cli_tail_count_not_reached_and_bad_zone(broker: Broker, topic_prefix: str) -> None:
    proc = _cli(*broker.cli_args(), "--prefix", topic_prefix, "--count", "1", "--timeout",
                "0.5")
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 1 and "0 of 1 events within 0.5 s" in stderr and stdout == ""
    proc = _cli(*broker.cli_args(), "--zone", "a/b", "--timeout", "1")
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 2 and "zone 'a/b' is not a valid zone name" in stderr


def test_cli_tail_unreachable_broker_exits_3() -> None:
    proc = _cli("--port", str(free_port()), "--no-tls", "--timeout", "1")
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 3 and "no connection" in stderr


def snapshot(node: str, camera: str, seq: int, *, track: int = 7, at: str = "end",
             label: str = "person", jpeg: bytes | None = None, zones: tuple[str, ...] = (),
             legacy: bool = False) -> bytes:
    """A snapshot payload as an agent sends it (a real JPEG unless ``jpeg`` says otherwise;
    ``legacy``: as agents sent it before snapshots named their zones)."""
    if jpeg is None:
        ok, buf = cv2.imencode(".jpg", np.full((24, 16, 3), 40 + seq, np.uint8))
        assert ok
        jpeg = buf.tobytes()
    msg = snaps.build_snapshot(node=node, camera=camera, track=track, label=label, ts=T0 + seq,
                               score=0.9, box=(0.1, 0.2, 0.3, 0.4), crop=(0.05, 0.1, 0.35, 0.5),
                               width=16, height=24, jpeg=jpeg, at=at, zones=zones)
    msg["seq"] = seq
    if legacy:
        del msg["zones"]
    return orjson.dumps(msg)


def test_snapshots_have_their_own_series_beside_the_events(
    broker: Broker, publisher: Publishers, topic_prefix: str
) -> None:
    gaps: list[Gap] = []
    ev_t = contract.events_topic(topic_prefix, "n1", "a")
    shot_t = snaps.snapshots_topic(topic_prefix, "n1", "a")
    with subscriber(broker, topic_prefix=topic_prefix, snapshots=True,
                    on_gap=gaps.append) as sub:
        # the same seq numbers on both topics: two series, no false duplicate
        publisher.publish(ev_t, event("n1", "a", 0, type="new"))
        publisher.publish(shot_t, snapshot("n1", "a", 0, at="new"))
        publisher.publish(ev_t, event("n1", "a", 1, type="end", reason="lost"))
        publisher.publish(shot_t, snapshot("n1", "a", 1))
        publisher.publish(shot_t, snapshot("n1", "a", 1))  # redelivered
        publisher.publish(shot_t, snapshot("n1", "a", 3, track=8))  # 2 lost
        # an attack and a broken one: another node's name on n1's topic, not a JPEG
        publisher.publish(shot_t, snapshot("n2", "a", 4))
        publisher.publish(shot_t, snapshot("n1", "a", 5, jpeg=b"<script>"))
        got = collect(sub, 8)
    shots = [i for i in got if isinstance(i, Snapshot)]
    assert [(s.message.seq, s.message.at, s.message.track) for s in shots] == [
        (0, "new", 7), (1, "end", 7), (3, "end", 8)]
    assert [e.seq for e in events_of(got)] == [0, 1]
    assert shots[0].key == ("n1", "a", 0)
    assert cv2.imdecode(np.frombuffer(shots[1].message.image_bytes(), np.uint8),
                        cv2.IMREAD_COLOR).shape[:2] == (24, 16)
    assert gaps == [Gap("n1", "snapshots/a", 2, 2)]
    assert (sub.stats.duplicates, sub.stats.malformed) == (1, 2)


def test_a_snapshot_passes_the_zone_filter_by_the_zones_it_names(
    broker: Broker, publisher: Publishers, topic_prefix: str
) -> None:
    """A consumer started after the track's events (it saw none of them) still gets the
    snapshots of tracks that were in its zone: a snapshot names its track's zones."""
    shot_t = snaps.snapshots_topic(topic_prefix, "n1", "a")
    with subscriber(broker, topic_prefix=topic_prefix, snapshots=True, zone="dock",
                    label="person") as sub:
        publisher.publish(shot_t, snapshot("n1", "a", 0, at="new", track=7))  # not in yet
        publisher.publish(shot_t, snapshot("n1", "a", 1, track=9, zones=("yard",)))
        publisher.publish(shot_t, snapshot("n1", "a", 2, track=7, zones=("yard", "dock")))
        publisher.publish(shot_t, snapshot("n1", "a", 3, track=8, zones=("dock",),
                                           label="car"))  # the label filter still holds
        publisher.publish(shot_t, snapshot("n1", "a", 4, track=5, at="new", zones=("dock",)))
        got = collect(sub, 5)
    assert [(i.message.seq, i.message.track, i.message.zones)
            for i in got if isinstance(i, Snapshot)] == [
        (2, 7, ["yard", "dock"]), (4, 5, ["dock"])]
    assert sub.stats.filtered == 3


def test_an_older_agents_snapshot_passes_the_zone_filter_when_its_track_did(
    broker: Broker, publisher: Publishers, topic_prefix: str
) -> None:
    ev_t = contract.events_topic(topic_prefix, "n1", "a")
    shot_t = snaps.snapshots_topic(topic_prefix, "n1", "a")
    with subscriber(broker, topic_prefix=topic_prefix, snapshots=True, zone="dock",
                    label="person") as sub:
        publisher.publish(ev_t, event("n1", "a", 0, type="new", track=7))
        publisher.publish(shot_t, snapshot("n1", "a", 0, at="new", track=7, legacy=True))
        publisher.publish(ev_t, event("n1", "a", 1, track=7, zones=("dock",),
                                      in_zones=("dock",), reason="zone"))
        publisher.publish(ev_t, event("n1", "a", 2, type="end", track=9, zones=("yard",)))
        publisher.publish(shot_t, snapshot("n1", "a", 1, track=9, legacy=True))  # not in it
        publisher.publish(shot_t, snapshot("n1", "a", 2, track=7, legacy=True))  # was in it
        publisher.publish(shot_t, snapshot("n1", "a", 3, track=7, label="car", legacy=True))
        got = collect(sub, 7)
    assert [(i.message.seq, i.message.track) for i in got if isinstance(i, Snapshot)] == [
        (2, 7)]
    assert sub.stats.filtered == 5


def test_cli_tail_saves_each_snapshot_as_a_jpeg(
    broker: Broker, publisher: Publishers, topic_prefix: str, tmp_path: Path
) -> None:
    out = tmp_path / "shots"
    proc = _cli(*broker.cli_args(), "--prefix", topic_prefix, "--snapshots", str(out),
                "--count", "3", "--timeout", "30")
    try:
        head = _subscribed(proc)
        publisher.publish(contract.events_topic(topic_prefix, "n1", "a"),
                          event("n1", "a", 0, type="new", track=7))
        shot_t = snaps.snapshots_topic(topic_prefix, "n1", "a")
        new, end = snapshot("n1", "a", 0, at="new"), snapshot("n1", "a", 1, zones=("dock",))
        publisher.publish(shot_t, new)
        publisher.publish(shot_t, end)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert "snapshots/" in head
    files = sorted(p.name for p in out.iterdir())
    assert files == ["n1_a_7_end.jpg", "n1_a_7_new.jpg"]
    for name, payload in (("n1_a_7_new.jpg", new), ("n1_a_7_end.jpg", end)):
        assert (out / name).read_bytes() == base64.b64decode(orjson.loads(payload)["jpeg"])
    lines = stdout.splitlines()
    assert lines[1].startswith("n1/a seq=0 snapshot(new) track=7 label=person score=0.90 16x24")
    assert " zones=- saved=" in lines[1]
    assert lines[2].endswith(f" zones=dock saved={out / 'n1_a_7_end.jpg'}")
