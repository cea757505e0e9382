"""The outbox on a real SQLite file: seqs, commits, bounds and policies, corruption, metrics."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog
from prometheus_client import CollectorRegistry, generate_latest

from edge_agent.config import OutboxSettings
from edge_agent.contract.protocol import decode_result
from edge_agent.outbox.facade import Outbox
from edge_agent.outbox.seq import SEQ_BLOCK_MAX
from edge_agent.transport.metrics import register


def res(camera: str = "cam0", i: int = 0, node: str = "node-a") -> dict[str, Any]:
    return {"v": 1, "node": node, "camera": camera, "ts": 1.5 + i,
            "model": {"name": "m", "version": "1"}, "task": "classification",
            "frame": {"width": 64, "height": 48}, "latency_ms": {"inference": 2.0},
            "classes": [{"id": 3, "label": "cat", "score": 0.75}]}


def make(tmp_path: Path, **kw: Any) -> Outbox:
    clock = kw.pop("clock", time.time)
    cams = kw.pop("cameras", ())
    settings = OutboxSettings(path=tmp_path / "outbox.sqlite3", commit_interval_ms=10, **kw)
    return Outbox(settings, topic_prefix="pfx", cameras=cams, clock=clock).open()


def claim_all(ob: Outbox) -> list[tuple[int, str, bytes]]:
    rows: list[tuple[int, str, bytes]] = []
    while True:
        got = ob.claim(1000, timeout=0.0)
        if not got:
            return rows
        rows.extend(got)


def seqs_of(rows: list[tuple[int, str, bytes]]) -> list[int]:
    return [orjson.loads(p)["seq"] for _, _, p in rows]


def test_publish_assigns_increasing_seqs_per_camera_and_commits(tmp_path: Path) -> None:
    before = time.time_ns() // 1000
    ob = make(tmp_path, cameras=["cam0"])
    try:
        a = [ob.publish(res("cam0", i)) for i in range(5)]
        b = [ob.publish(res("cam1", i)) for i in range(3)]
        assert a == list(range(a[0], a[0] + 5))
        assert b == list(range(b[0], b[0] + 3))
        # a camera new to the file starts at the wall clock in microseconds, not at 0
        assert a[0] >= before and b[0] >= before
        assert ob.flush()
        assert ob.depth == 8
        rows = claim_all(ob)
        assert [r[1] for r in rows] == ["pfx/node-a/results/cam0"] * 5 + \
            ["pfx/node-a/results/cam1"] * 3
        msgs = [decode_result(p) for _, _, p in rows]
        assert [m.seq for m in msgs] == a + b
        assert msgs[0].classes is not None and msgs[0].classes[0].label == "cat"
    finally:
        ob.close()


def test_seqs_never_go_back_after_reopen(tmp_path: Path) -> None:
    ob = make(tmp_path)
    first = [ob.publish(res("cam0", i)) for i in range(1000)]
    ob.close()
    ob = make(tmp_path)
    try:
        nxt = ob.publish(res("cam0"))
        assert nxt > first[-1]
        assert nxt - first[-1] <= SEQ_BLOCK_MAX  # at most one reserved block skipped
    finally:
        ob.close()


def test_unacked_rows_survive_reopen_and_acked_are_deleted(tmp_path: Path) -> None:
    ob = make(tmp_path)
    seqs = [ob.publish(res("cam0", i)) for i in range(10)]
    assert ob.flush()
    rows = ob.claim(4, timeout=1.0)
    assert seqs_of(rows) == seqs[:4]
    for rid, topic, payload in rows:
        ob.ack(rid, len(topic) + len(payload))
    assert ob.flush()
    assert ob.depth == 6
    assert ob.stats.delivered == 4
    ob.close()
    ob = make(tmp_path)
    try:
        assert ob.depth == 6
        assert seqs_of(claim_all(ob)) == seqs[4:]
    finally:
        ob.close()


@pytest.mark.parametrize("policy", ["drop-oldest", "reject-new"])
def test_row_cap_policy(tmp_path: Path, policy: str) -> None:
    ob = make(tmp_path, max_rows=10, policy=policy)
    try:
        seqs = [ob.publish(res("cam0", i)) for i in range(15)]
        assert ob.flush()
        assert ob.depth == 10
        assert ob.dropped() == {"max_rows": 5}
        kept = seqs[5:] if policy == "drop-oldest" else seqs[:10]
        assert seqs_of(claim_all(ob)) == kept
    finally:
        ob.close()


def test_drop_oldest_never_drops_claimed_rows(tmp_path: Path) -> None:
    ob = make(tmp_path, max_rows=10)
    try:
        seqs = [ob.publish(res("cam0", i)) for i in range(10)]
        assert ob.flush()
        claimed = ob.claim(3, timeout=1.0)  # in flight: the broker may already have them
        seqs += [ob.publish(res("cam0", i)) for i in range(5)]
        assert ob.flush()
        assert ob.dropped() == {"max_rows": 5}
        assert seqs_of(claim_all(ob)) == seqs[8:]
        ob.close()
        ob = make(tmp_path, max_rows=10)
        assert seqs_of(claim_all(ob)) == seqs[:3] + seqs[8:]
        assert seqs_of(claimed) == seqs[:3]
    finally:
        ob.close()


def test_max_age_expires_old_results(tmp_path: Path) -> None:
    now = [1000.0]
    ob = make(tmp_path, max_age_s=60.0, clock=lambda: now[0])
    try:
        old = [ob.publish(res("cam0", i)) for i in range(5)]
        assert ob.flush()
        assert ob.oldest_age_s() == 0.0
        now[0] += 30
        assert ob.oldest_age_s() == pytest.approx(30.0)
        assert ob.flush()
        assert ob.depth == 5
        now[0] += 31
        new = [ob.publish(res("cam0", i)) for i in range(2)]
        assert ob.flush()
        assert ob.dropped() == {"max_age": 5}
        assert seqs_of(claim_all(ob)) == new
        assert new[0] > old[-1]
    finally:
        ob.close()


def test_garbage_file_is_moved_aside_and_a_new_one_started(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    path.write_bytes(b"this is not a database, " * 1000)
    ob = make(tmp_path)
    try:
        assert ob.stats.corrupt_files == 1
        aside = list(tmp_path.glob("outbox.sqlite3.corrupt-*"))
        assert len(aside) == 1
        assert aside[0].read_bytes().startswith(b"this is not a database")
        ob.publish(res())
        assert ob.flush()
        assert ob.depth == 1
    finally:
        ob.close()


def test_damaged_pages_are_detected_at_open(tmp_path: Path) -> None:
    ob = make(tmp_path)
    for i in range(3000):
        ob.publish(res("cam0", i))
    ob.close()
    path = tmp_path / "outbox.sqlite3"
    raw = bytearray(path.read_bytes())
    assert len(raw) > 64 * 1024
    raw[8192:8192 + 4096 * 6] = b"\xa5" * (4096 * 6)  # clobber B-tree pages, header intact
    path.write_bytes(bytes(raw))
    ob = make(tmp_path)
    try:
        assert ob.stats.corrupt_files == 1
        assert ob.depth == 0
        ob.publish(res())
        assert ob.flush()
        assert ob.depth == 1
        bad = sqlite3.connect(next(tmp_path.glob("outbox.sqlite3.corrupt-*")))
        try:
            with pytest.raises(sqlite3.DatabaseError):
                bad.execute("SELECT count(*), sum(length(payload)) FROM results").fetchone()
        finally:
            bad.close()
    finally:
        ob.close()


def test_unopenable_path_keeps_accepting_within_memory_bound(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    settings = OutboxSettings(path=blocker / "sub" / "outbox.sqlite3",
                              max_pending_bytes=64 * 1024, commit_interval_ms=10)
    ob = Outbox(settings, topic_prefix="pfx").open()
    try:
        assert not ob.stats.db_open
        seqs = [ob.publish(res("cam0", i)) for i in range(1000)]  # never raises
        assert seqs == sorted(seqs) and len(set(seqs)) == 1000
        assert not ob.flush(timeout=2.0)
        dropped = ob.dropped()
        assert set(dropped) == {"db_error"}
        assert ob.depth + dropped["db_error"] == 1000
        assert ob.bytes_used() <= 64 * 1024
    finally:
        ob.close()


def test_drops_are_logged_once_per_interval(tmp_path: Path) -> None:
    ob = make(tmp_path, max_rows=5)
    try:
        with structlog.testing.capture_logs() as logs:
            for _ in range(3):
                for i in range(20):
                    ob.publish(res("cam0", i))
                assert ob.flush()
        lines = [e for e in logs if e["event"] == "outbox_dropped"]
        assert len(lines) == 1, lines
        assert lines[0]["log_level"] == "warning"
        assert lines[0]["new"]["max_rows"] > 0
        assert ob.dropped() == {"max_rows": 55}
    finally:
        ob.close()


def test_metrics_and_snapshot(tmp_path: Path) -> None:
    ob = make(tmp_path, max_rows=3)
    try:
        for i in range(5):
            ob.publish(res("cam0", i))
        assert ob.flush()
        reg = CollectorRegistry()
        register(reg, ob)
        text = generate_latest(reg).decode()
        assert "edge_agent_outbox_depth 3.0" in text
        assert 'edge_agent_outbox_dropped_total{reason="max_rows"} 2.0' in text
        assert 'edge_agent_outbox_dropped_total{reason="disk_full"} 0.0' in text
        assert "edge_agent_outbox_appended_total 3.0" in text
        snap = ob.snapshot()
        assert snap.depth == 3 and snap.dropped == {"max_rows": 2} and snap.bytes > 0
    finally:
        ob.close()


def test_publish_does_not_touch_the_disk_within_a_reserved_block(tmp_path: Path) -> None:
    """publish only appends in memory: a commit in progress does not stall it."""
    ob = make(tmp_path, cameras=["cam0"])
    try:
        with ob.holding_db():  # hold the database as a long commit would
            for i in range(200):  # the block reserved at open covers these
                ob.publish(res("cam0", i))
        assert ob.flush()
        assert ob.depth == 200
    finally:
        ob.close()
