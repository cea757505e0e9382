"""The results consumer against the real broker: duplicates dropped, gaps reported, shared groups
split the load, malformed payloads counted and skipped, a slow consumer loses nothing."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from structlog.testing import capture_logs

from edge_agent.contract.protocol import MAX_PAYLOAD_BYTES, results_topic
from hub.client.results import (
    Deduplicator,
    Gap,
    Received,
    Reset,
    ResultSubscriber,
    ResultsUnavailableError,
)
from tests.support.broker import CONSUMER, Broker, Publishers, free_port

ROOT = Path(__file__).resolve().parents[3]


def payload(node: str, camera: str, seq: int, ts: float | None = None, **extra: object) -> bytes:
    """A results payload as an agent sends it."""
    msg: dict[str, object] = {
        "v": 1,
        "node": node,
        "camera": camera,
        "seq": seq,
        "ts": 1_700_000_000.0 + seq if ts is None else ts,
        "model": {"name": "det", "version": "1.0.0"},
        "task": "yolo",
        "frame": {"width": 640, "height": 480},
        "latency_ms": {"inference": 4.0, "end_to_end": 6.5},
        "detections": [{"cls": 0, "label": "person", "score": 0.9, "box": [0.1, 0.2, 0.3, 0.4]}],
    }
    msg.update(extra)
    return orjson.dumps(msg)


@pytest.fixture
def publisher(broker: Broker) -> Iterator[Publishers]:
    """Publishes each result as the node its topic names (the agents' own certificates)."""
    p = Publishers(broker)
    yield p
    p.close()


def publish(p: Publishers, topic: str, data: bytes) -> None:
    p.publish(topic, data)


def subscriber(broker: Broker, **kw: Any) -> ResultSubscriber:
    """A subscriber logged in as the tests' consumer identity."""
    return ResultSubscriber(**broker.settings(CONSUMER), **kw)


def collect(sub: ResultSubscriber, received: int, timeout: float = 10.0) -> list[Received]:
    """Take results until the subscriber has processed ``received`` messages in all."""
    out: list[Received] = []
    deadline = time.monotonic() + timeout
    while sub.stats.received < received:
        assert time.monotonic() < deadline, f"only {sub.stats.received} of {received} came"
        r = sub.get(timeout=0.1)
        if r is not None:
            out.append(r)
    return out


def test_duplicates_dropped_gaps_reported_late_delivered(
    broker: Broker, publisher: Publishers, topic_prefix: str
) -> None:
    gaps: list[Gap] = []
    with subscriber(broker, topic_prefix=topic_prefix, on_gap=gaps.append) as sub:
        seqs = [0, 1, 1, 2, 5, 6, 0, 3, 3]
        for s in seqs:
            publish(
                publisher, results_topic(topic_prefix, "n1", "cam-a"), payload("n1", "cam-a", s)
            )
        got = collect(sub, len(seqs))
    assert [r.message.seq for r in got] == [0, 1, 2, 5, 6, 3]
    assert [r.late for r in got] == [False] * 5 + [True]
    assert gaps == [Gap("n1", "cam-a", 3, 4)]
    assert gaps[0].count == 2
    st = sub.stats
    assert (st.duplicates, st.gaps, st.missing, st.late, st.delivered) == (3, 1, 2, 1, 6)
    assert got[0].key == ("n1", "cam-a", 0)


def test_streams_are_independent_and_a_restarted_counter_is_a_reset(
    broker: Broker, publisher: Publishers, topic_prefix: str
) -> None:
    with subscriber(broker, topic_prefix=topic_prefix, on_gap=None) as sub:
        t = results_topic(topic_prefix, "n1", "a")
        u = results_topic(topic_prefix, "n1", "b")
        publish(publisher, t, payload("n1", "a", 10, ts=100.0))
        publish(publisher, u, payload("n1", "b", 10, ts=100.0))  # same seq, other camera: new
        publish(publisher, t, payload("n1", "a", 11, ts=101.0))
        # the agent's outbox was wiped: its counter starts again, with newer frame times
        publish(publisher, t, payload("n1", "a", 0, ts=200.0))
        publish(publisher, t, payload("n1", "a", 1, ts=201.0))
        publish(publisher, t, payload("n1", "a", 0, ts=200.0))  # a redelivery: duplicate
        got = collect(sub, 6)
    assert [(r.message.camera, r.message.seq) for r in got] == [
        ("a", 10),
        ("b", 10),
        ("a", 11),
        ("a", 0),
        ("a", 1),
    ]
    assert (sub.stats.resets, sub.stats.duplicates, sub.stats.gaps) == (1, 1, 0)


def test_malformed_payloads_are_counted_and_skipped(
    broker: Broker, publisher: Publishers, topic_prefix: str
) -> None:
    t = results_topic(topic_prefix, "n1", "a")
    bad = [
        b"not json",
        b"[1, 2]",
        payload("n1", "a", 0, v=2),
        orjson.dumps({"v": 1, "node": "n1", "camera": "a"}),  # required fields missing
        payload("n1", "a", -1),
        payload("n2", "a", 0),  # says another node than its topic
        b'{"v": 1, "pad": "' + b"x" * MAX_PAYLOAD_BYTES + b'"}',
    ]
    with (
        capture_logs() as logs,
        subscriber(broker, topic_prefix=topic_prefix) as sub,
    ):
        for b in bad:
            publish(publisher, t, b)
        publish(publisher, f"{topic_prefix}/n1/results/a/extra", payload("n1", "a", 0))
        publish(publisher, t, payload("n1", "a", 0))
        got = collect(sub, len(bad) + 1)
    # the topic with an extra level does not match the filter at all: never received
    assert [r.message.seq for r in got] == [0]
    assert sub.stats.malformed == len(bad)
    assert sub.stats.delivered == 1
    events = [e for e in logs if e["event"] == "results_malformed"]
    assert events, "malformed payloads must be logged"
    assert len(events) < len(bad), "the warning is rate-limited, not one line per payload"


def test_node_and_camera_filters(broker: Broker, publisher: Publishers, topic_prefix: str) -> None:
    with subscriber(
        broker, topic_prefix=topic_prefix, node="n1", camera="a"
    ) as sub:
        publish(publisher, results_topic(topic_prefix, "n1", "b"), payload("n1", "b", 0))
        publish(publisher, results_topic(topic_prefix, "n2", "a"), payload("n2", "a", 0))
        publish(publisher, results_topic(topic_prefix, "n1", "a"), payload("n1", "a", 7))
        got = collect(sub, 1)
        assert sub.get(timeout=0.2) is None
    assert [r.key for r in got] == [("n1", "a", 7)]
    assert sub.stats.received == 1


def test_two_consumers_in_a_group_split_the_load(
    broker: Broker, publisher: Publishers, topic_prefix: str
) -> None:
    n = 120
    with (
        subscriber(broker, topic_prefix=topic_prefix, group="g1") as g1,
        subscriber(broker, topic_prefix=topic_prefix, group="g1") as g2,
        subscriber(broker, topic_prefix=topic_prefix) as everyone,
    ):
        assert g1.filter == f"$share/g1/{topic_prefix}/+/results/+"
        for i in range(n):
            cam = "ab"[i % 2]
            publish(publisher, results_topic(topic_prefix, "n1", cam), payload("n1", cam, i // 2))
        all_keys = {r.key for r in collect(everyone, n)}
        k1: set[tuple[str, str, int]] = set()
        k2: set[tuple[str, str, int]] = set()
        deadline = time.monotonic() + 10
        while g1.stats.received + g2.stats.received < n:
            assert time.monotonic() < deadline
            for sub, keys in ((g1, k1), (g2, k2)):
                r = sub.get(timeout=0.05)
                if r is not None:
                    keys.add(r.key)
    assert len(all_keys) == n
    assert k1 and k2, "both members must get a share"
    assert not (k1 & k2), "each result goes to one member of the group"
    assert k1 | k2 == all_keys
    # each member sees holes in every stream: in a group they are not reported as gaps
    assert g1.stats.gaps == g2.stats.gaps == 0
    assert g1.stats.delivered + g2.stats.delivered == n


def test_slow_consumer_holds_the_broker_back_and_loses_nothing(
    broker: Broker, publisher: Publishers, topic_prefix: str
) -> None:
    n = 300
    with subscriber(
        broker, topic_prefix=topic_prefix, receive_maximum=5, on_gap=None
    ) as sub:
        t = results_topic(topic_prefix, "n1", "a")
        for i in range(n):
            publish(publisher, t, payload("n1", "a", i))
        deadline = time.monotonic() + 10
        while sub.pending() < 5:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        # the broker keeps the rest until results are taken (Receive Maximum + manual PUBACK)
        assert sub.pending() == 5
        got = collect(sub, n, timeout=30)
    assert [r.message.seq for r in got] == list(range(n))
    assert sub.stats.duplicates == sub.stats.gaps == 0


def test_unreachable_broker_is_a_clear_error() -> None:
    sub = ResultSubscriber(port=free_port())
    with pytest.raises(ResultsUnavailableError, match="no connection"):
        sub.start(timeout=1.0)


def test_group_name_is_checked() -> None:
    with pytest.raises(ValueError, match="group"):
        ResultSubscriber(group="a/b")


def test_deduplicator_ranges() -> None:
    d = Deduplicator(max_ranges=2)
    assert d.offer("n", "c", 0, 0.0) == ("new", None)
    assert d.offer("n", "c", 10, 10.0) == ("new", Gap("n", "c", 1, 9))
    assert d.offer("n", "c", 5, 5.0)[0] == "late"  # splits 1..9 into 1..4 and 6..9
    assert d.offer("n", "c", 5, 5.0)[0] == "duplicate"
    assert d.offer("n", "c", 1, 1.0)[0] == "late"
    assert d.offer("n", "c", 9, 9.0)[0] == "late"
    assert d.offer("n", "c", 20, 20.0) == ("new", Gap("n", "c", 11, 19))
    # three ranges now exceed max_ranges=2: the oldest (2..4) was forgotten
    assert d.offer("n", "c", 3, 3.0)[0] == "duplicate"
    assert d.offer("n", "c", 7, 7.0)[0] == "late"
    # in a group: holes are remembered (a redelivery is not a duplicate) but not reported
    g = Deduplicator(report_gaps=False)
    assert g.offer("n", "c", 0, 0.0) == ("new", None)
    assert g.offer("n", "c", 4, 4.0) == ("new", None)
    assert g.offer("n", "c", 2, 2.0) == ("new", None)
    assert g.offer("n", "c", 2, 2.0)[0] == "duplicate"


def test_deduplicator_tells_a_marked_reset_from_a_gap() -> None:
    d = Deduplicator()
    assert d.offer("n", "c", 100, 1.0) == ("new", None)
    assert d.offer("n", "c", 101, 2.0) == ("new", None)
    # the agent's outbox was replaced: a new series, marked, far above (clock based)
    assert d.offer("n", "c", 5000, 3.0, 5000) == ("reset", None)
    assert d.previous("n", "c") == 101
    assert d.offer("n", "c", 5000, 3.0, 5000)[0] == "duplicate"  # the marked one, resent
    assert d.offer("n", "c", 5001, 4.0) == ("new", None)
    assert d.offer("n", "c", 101, 2.0)[0] == "duplicate"  # an old-series redelivery
    # a new series whose first results the agent dropped: a reset, and a gap inside it
    assert d.offer("n", "c", 9003, 5.0, 9000) == ("reset", Gap("n", "c", 9000, 9002))
    # a clock that went back: a marker for another series is a reset, even below
    assert d.offer("n", "c", 40, 6.0, 40) == ("reset", None)
    assert d.previous("n", "c") == 9003
    # a stream first met mid-series (first unknown): a resent marker of that series is
    # below the highest seq and no reset
    assert d.offer("n", "d", 7, 1.0) == ("new", None)
    assert d.offer("n", "d", 5, 0.5, 5)[0] == "duplicate"
    assert d.offer("n", "d", 8, 1.5) == ("new", None)
    # a marker on a stream not seen before is just its start
    assert d.offer("n", "e", 70, 1.0, 70) == ("new", None)


def test_subscriber_reports_a_reset_apart_from_gaps(
    broker: Broker, publisher: Publishers, topic_prefix: str
) -> None:
    gaps: list[Gap] = []
    resets: list[Reset] = []
    with subscriber(broker, topic_prefix=topic_prefix, on_gap=gaps.append,
                    on_reset=resets.append) as sub:
        t = results_topic(topic_prefix, "n1", "a")
        marker = {"first": 900, "reason": "new_outbox"}
        for seq in (10, 11, 900, 901, 903):
            extra = {"seq_reset": marker} if seq == 900 else {}
            publish(publisher, t, payload("n1", "a", seq, None, **extra))
        got = collect(sub, 5)
    assert [(r.message.seq, r.reset) for r in got] == [
        (10, False), (11, False), (900, True), (901, False), (903, False)]
    assert got[2].message.seq_reset is not None and got[2].message.seq_reset.first == 900
    assert resets == [Reset("n1", "a", 900, 900, 11, "new_outbox")]
    assert gaps == [Gap("n1", "a", 902, 902)]  # the only loss
    assert (sub.stats.resets, sub.stats.gaps, sub.stats.missing) == (1, 1, 1)


def _cli(*args: str, timeout: float = 30) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "hub", "results", "tail", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_cli_tail_writes_json_lines_and_reports_gaps(
    broker: Broker, publisher: Publishers, topic_prefix: str, tmp_path: Path
) -> None:
    out = tmp_path / "results.jsonl"
    proc = _cli(
        *broker.cli_args(),
        "--prefix",
        topic_prefix,
        "--node",
        "n1",
        "--output",
        str(out),
        "--count",
        "4",
        "--timeout",
        "30",
    )
    try:
        t = results_topic(topic_prefix, "n1", "a")
        # the CLI subscribes at some point after it starts: re-send seq 0 until it is seen
        # (the copies are exactly the duplicates it must drop)
        deadline = time.monotonic() + 20
        while not (out.exists() and out.read_text()):
            assert time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "no line"
            publish(publisher, t, payload("n1", "a", 0))
            time.sleep(0.05)
        publish(publisher, results_topic(topic_prefix, "n2", "a"), payload("n2", "a", 1))
        publish(publisher, t, payload("n1", "a", 1))
        publish(publisher, t, payload("n1", "a", 4))
        publish(publisher, t, payload("n1", "a", 7000,
                                      seq_reset={"first": 7000, "reason": "corrupt_outbox"}))
        stdout, stderr = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    lines = [orjson.loads(x) for x in out.read_text().splitlines()]
    assert [(m["node"], m["seq"]) for m in lines] == [("n1", 0), ("n1", 1), ("n1", 4),
                                                      ("n1", 7000)]
    assert lines[0]["detections"][0]["label"] == "person"
    assert lines[3]["seq_reset"] == {"first": 7000, "reason": "corrupt_outbox"}
    assert "gap: n1/a seq 2..3 (2 missing)" in stderr
    assert "reset: n1/a seq series restarted at 7000 after seq 4 (corrupt_outbox; not a loss)" \
        in stderr
    assert "gap: n1/a seq 5" not in stderr
    summary = orjson.loads(stderr.split("summary: ")[1].splitlines()[0])
    assert summary["delivered"] == 4 and summary["gaps"] == 1 and summary["resets"] == 1
    assert summary["missing"] == 2
    assert summary["duplicates"] == summary["received"] - 4
    assert stdout == ""


def test_cli_tail_prints_one_line_per_result(
    broker: Broker, publisher: Publishers, topic_prefix: str
) -> None:
    proc = _cli(
        *broker.cli_args(), "--prefix", topic_prefix, "--count", "1", "--timeout", "20"
    )
    try:
        deadline = time.monotonic() + 20
        while proc.poll() is None:
            assert time.monotonic() < deadline
            publish(publisher, results_topic(topic_prefix, "n1", "a"), payload("n1", "a", 0))
            time.sleep(0.05)
        stdout, stderr = proc.communicate(timeout=5)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert stdout == "n1/a seq=0 model=det@1.0.0 detections=1 top=person:0.90 e2e=6.5ms\n"


def test_cli_tail_count_not_reached(broker: Broker, topic_prefix: str) -> None:
    proc = _cli(
        *broker.cli_args(), "--prefix", topic_prefix, "--count", "1", "--timeout", "0.5"
    )
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert "0 of 1 results within 0.5 s" in stderr
    assert stdout == ""


def test_cli_tail_unreachable_broker_exits_3() -> None:
    proc = _cli("--port", str(free_port()), "--timeout", "1")
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 3
    assert "edge-hub: error:" in stderr and "no connection" in stderr


def test_cli_tail_on_a_terminal_prints_no_log_lines(
    broker: Broker, publisher: Publishers, topic_prefix: str
) -> None:
    import os
    import pty

    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_HUB_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "hub", "results", "tail", *broker.cli_args(), "--prefix",
         topic_prefix, "--count", "1", "--timeout", "20"],
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    seen = b""
    try:
        deadline = time.monotonic() + 20
        while proc.poll() is None:
            assert time.monotonic() < deadline, seen
            publish(publisher, results_topic(topic_prefix, "n1", "a"), payload("n1", "a", 0))
            time.sleep(0.05)
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the terminal closed with the process
                break
            if not chunk:
                break
            seen += chunk
    finally:
        proc.kill()
        os.close(master)
    text = seen.decode(errors="replace").replace("\r\n", "\n")
    assert proc.returncode == 0, text
    lines = [x for x in text.splitlines() if x.strip()]
    assert lines[0].startswith("subscribed: ") and "results_subscribed" not in text, text
    assert "n1/a seq=0 model=det@1.0.0" in lines[1], text
    assert lines[-1].startswith("summary: ") and len(lines) == 3, text
