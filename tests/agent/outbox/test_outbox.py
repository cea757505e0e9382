"""The outbox on a real SQLite file: seqs, commits, bounds and policies, corruption, metrics."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
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
from edge_agent.transport.metrics import register

ROOT = Path(__file__).resolve().parents[3]


def res(camera: str = "cam0", i: int = 0, node: str = "node-a") -> dict[str, Any]:
    return {"v": 1, "node": node, "camera": camera, "ts": 1.5 + i,
            "model": {"name": "m", "version": "1"}, "task": "classification",
            "frame": {"width": 64, "height": 48}, "latency_ms": {"inference": 2.0},
            "classes": [{"id": 3, "label": "cat", "score": 0.75}]}


def make(tmp_path: Path, **kw: Any) -> Outbox:
    clock = kw.pop("clock", time.time)
    settings = OutboxSettings(path=tmp_path / "outbox.sqlite3", commit_interval_ms=10, **kw)
    return Outbox(settings, topic_prefix="pfx", clock=clock).open()


def claim_all(ob: Outbox) -> list[tuple[int, str, bytes]]:
    rows: list[tuple[int, str, bytes]] = []
    while True:
        got = ob.claim(1000, timeout=0.0)
        if not got:
            return rows
        rows.extend(got)


def ack_all(ob: Outbox, rows: list[tuple[int, str, bytes]]) -> None:
    for rid, topic, payload in rows:
        ob.ack(rid, len(topic) + len(payload))
    assert ob.flush()


def seqs_of(rows: list[tuple[int, str, bytes]]) -> list[int]:
    return [orjson.loads(p)["seq"] for _, _, p in rows]


def resets_of(rows: list[tuple[int, str, bytes]]) -> list[tuple[int, dict[str, Any]]]:
    """(seq, marker) of the rows that carry a ``seq_reset`` marker."""
    out = []
    for _, _, p in rows:
        obj = orjson.loads(p)
        if "seq_reset" in obj:
            out.append((obj["seq"], obj["seq_reset"]))
    return out


def publish_n(ob: Outbox, n: int, camera: str = "cam0") -> None:
    for i in range(n):
        ob.publish(res(camera, i))


def test_commit_gives_contiguous_seqs_per_camera_and_marks_a_new_series(tmp_path: Path) -> None:
    before = time.time_ns() // 1000
    ob = make(tmp_path)
    try:
        for i in range(5):
            ob.publish(res("cam0", i))
            if i < 3:
                ob.publish(res("cam1", i))
        assert ob.flush()
        assert ob.depth == 8
        rows = claim_all(ob)
        assert [r[1] for r in rows] == ["pfx/node-a/results/cam0", "pfx/node-a/results/cam1"] \
            * 3 + ["pfx/node-a/results/cam0"] * 2
        msgs = [decode_result(p) for _, _, p in rows]
        a = [m.seq for m in msgs if m.camera == "cam0"]
        b = [m.seq for m in msgs if m.camera == "cam1"]
        assert a == list(range(a[0], a[0] + 5))
        assert b == list(range(b[0], b[0] + 3))
        # a new series starts at the wall clock in microseconds, not at 0, and says so once
        assert a[0] >= before and b[0] >= before
        marks = [(m.camera, m.seq, m.seq_reset) for m in msgs if m.seq_reset is not None]
        assert [(c, s, r.first, r.reason) for c, s, r in marks if r is not None] == [
            ("cam0", a[0], a[0], "new_outbox"), ("cam1", b[0], b[0], "new_outbox")]
        assert msgs[0].classes is not None and msgs[0].classes[0].label == "cat"
        # seq is the payload's last field, as before
        assert rows[2][2].endswith(b',"seq":%d}' % a[1])
    finally:
        ob.close()


def test_seqs_go_on_without_a_gap_after_reopen(tmp_path: Path) -> None:
    ob = make(tmp_path)
    publish_n(ob, 1000)
    ob.close()
    ob = make(tmp_path)
    try:
        publish_n(ob, 1)
        assert ob.flush()
        rows = claim_all(ob)
        seqs = seqs_of(rows)
        assert seqs == list(range(seqs[0], seqs[0] + 1001))  # no block skipped
        assert [s for s, _ in resets_of(rows)] == [seqs[0]]  # one marker, the first series' own
    finally:
        ob.close()


_CRASH = """
import os, signal, sys
from pathlib import Path
from edge_agent.config import OutboxSettings
from edge_agent.outbox.facade import Outbox
from tests.agent.outbox.test_outbox import publish_n
ob = Outbox(OutboxSettings(path=Path(sys.argv[1]), commit_interval_ms=10),
            topic_prefix="pfx").open()
publish_n(ob, 10)
assert ob.flush()
with ob.holding_db():  # no commit can run: these 5 die in memory with the process
    publish_n(ob, 5)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_results_lost_in_a_crash_never_had_a_seq(tmp_path: Path) -> None:
    """kill -9 with results not yet committed: the next process goes on right after the last
    committed seq (the lost ones were never numbered on the wire)."""
    proc = subprocess.run([sys.executable, "-c", _CRASH, str(tmp_path / "outbox.sqlite3")],
                          cwd=ROOT, capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    ob = make(tmp_path)
    try:
        assert ob.depth == 10
        publish_n(ob, 1)
        assert ob.flush()
        seqs = seqs_of(claim_all(ob))
        assert seqs == list(range(seqs[0], seqs[0] + 11))
    finally:
        ob.close()


def test_results_dropped_in_memory_leave_their_gap(tmp_path: Path) -> None:
    """In a running process, a result that was taken and then dropped keeps its seq unused."""
    ob = make(tmp_path, policy="reject-new", max_rows=3)
    try:
        publish_n(ob, 5)  # the last 2 are refused in publish (3 rows at most)
        assert ob.flush()
        rows = claim_all(ob)
        s0 = seqs_of(rows)[0]
        ack_all(ob, rows)
        ob.close()  # a clean restart: the refused ones' seqs are stored as used
        ob = make(tmp_path, policy="reject-new", max_rows=3)
        publish_n(ob, 1)
        assert ob.flush()
        assert seqs_of(rows) == [s0, s0 + 1, s0 + 2]
        assert seqs_of(claim_all(ob)) == [s0 + 5]
    finally:
        ob.close()


def test_unacked_rows_survive_reopen_and_acked_are_deleted(tmp_path: Path) -> None:
    ob = make(tmp_path)
    publish_n(ob, 10)
    assert ob.flush()
    rows = ob.claim(4, timeout=1.0)
    seqs = seqs_of(rows)
    ack_all(ob, rows)
    assert ob.depth == 6
    assert ob.stats.delivered == 4
    ob.close()
    ob = make(tmp_path)
    try:
        assert ob.depth == 6
        assert seqs_of(claim_all(ob)) == list(range(seqs[0] + 4, seqs[0] + 10))
    finally:
        ob.close()


def test_a_deleted_outbox_starts_a_new_series_with_a_marker(tmp_path: Path) -> None:
    ob = make(tmp_path)
    publish_n(ob, 20)
    assert ob.flush()
    old = seqs_of(claim_all(ob))
    ob.close()
    for f in tmp_path.glob("outbox.sqlite3*"):
        f.unlink()
    ob = make(tmp_path)
    try:
        publish_n(ob, 3)
        assert ob.flush()
        rows = claim_all(ob)
        new = seqs_of(rows)
        assert new[0] > old[-1] and new == list(range(new[0], new[0] + 3))
        assert resets_of(rows) == [(new[0], {"first": new[0], "reason": "new_outbox"})]
    finally:
        ob.close()


def test_the_marker_stays_until_its_row_is_acknowledged(tmp_path: Path) -> None:
    ob = make(tmp_path)
    publish_n(ob, 3)
    assert ob.flush()
    first = claim_all(ob)  # claimed, never acknowledged: the next process sends it again
    ob.close()
    ob = make(tmp_path)
    rows = claim_all(ob)
    assert rows == first and len(resets_of(rows)) == 1
    ack_all(ob, rows)
    ob.close()
    ob = make(tmp_path)
    try:
        publish_n(ob, 2)
        assert ob.flush()
        later = claim_all(ob)
        assert resets_of(later) == []
        assert seqs_of(later)[0] == seqs_of(rows)[-1] + 1
    finally:
        ob.close()


def test_the_marked_row_is_never_dropped_by_the_bounds(tmp_path: Path) -> None:
    now = [1000.0]
    ob = make(tmp_path, max_rows=3, max_age_s=60.0, clock=lambda: now[0])
    try:
        publish_n(ob, 1)
        assert ob.flush()  # the series' first row, marked
        publish_n(ob, 10)
        assert ob.flush()  # room for 2 of them
        publish_n(ob, 5)
        assert ob.flush()  # drop-oldest deletes those 2, skipping the marked row
        assert ob.dropped() == {"max_rows": 13}
        now[0] += 61  # everything but the marked row expires
        assert ob.flush()
        assert ob.dropped() == {"max_rows": 13, "max_age": 2}
        assert ob.oldest_age_s() == 0.0  # the marked row does not keep expiry due
        rows = claim_all(ob)
        s0 = seqs_of(rows)[0]
        assert seqs_of(rows) == [s0]
        assert resets_of(rows) == [(s0, {"first": s0, "reason": "new_outbox"})]
        publish_n(ob, 1)
        assert ob.flush()
        assert seqs_of(claim_all(ob)) == [s0 + 16]  # the 15 dropped ones are a gap
    finally:
        ob.close()


def test_a_file_of_the_block_reserving_version_is_upgraded_with_a_marker(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE results (id INTEGER PRIMARY KEY, t REAL NOT NULL, topic TEXT NOT NULL, "
        "payload BLOB NOT NULL);"
        "CREATE TABLE seqs (camera TEXT PRIMARY KEY, next_free INTEGER NOT NULL);"
        "INSERT INTO seqs VALUES ('cam0', 5256);"
        f"INSERT INTO results VALUES (7, {time.time()}, 'pfx/node-a/results/cam0', "
        "'{\"v\":1,\"seq\":5000}');")
    conn.close()
    ob = make(tmp_path)
    try:
        publish_n(ob, 2)
        assert ob.flush()
        rows = claim_all(ob)
        assert rows[0][0] == 7 and seqs_of(rows) == [5000, 5256, 5257]
        assert resets_of(rows) == [(5256, {"first": 5256, "reason": "upgrade"})]
    finally:
        ob.close()


@pytest.mark.parametrize("policy", ["drop-oldest", "reject-new"])
def test_row_cap_policy(tmp_path: Path, policy: str) -> None:
    """The dropped results take their seqs: the loss is a gap downstream."""
    ob = make(tmp_path, max_rows=10, policy=policy)
    try:
        publish_n(ob, 1)
        assert ob.flush()
        rows = claim_all(ob)
        s0 = seqs_of(rows)[0]
        ack_all(ob, rows)
        publish_n(ob, 15)
        assert ob.flush()
        assert ob.depth == 10
        assert ob.dropped() == {"max_rows": 5}
        seqs = list(range(s0 + 1, s0 + 16))
        kept = seqs[5:] if policy == "drop-oldest" else seqs[:10]
        rows = claim_all(ob)
        assert seqs_of(rows) == kept
        ack_all(ob, rows)
        publish_n(ob, 1)  # reject-new refused 5 in publish: they took seqs too
        assert ob.flush()
        assert seqs_of(claim_all(ob)) == [s0 + 16]
    finally:
        ob.close()


def test_drop_oldest_never_drops_claimed_rows(tmp_path: Path) -> None:
    ob = make(tmp_path, max_rows=10)
    try:
        publish_n(ob, 10)
        assert ob.flush()
        claimed = ob.claim(3, timeout=1.0)  # in flight: the broker may already have them
        s0 = seqs_of(claimed)[0]
        seqs = list(range(s0, s0 + 15))
        publish_n(ob, 5)
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
        publish_n(ob, 5)
        assert ob.flush()
        rows = ob.claim(1, timeout=1.0)
        ack_all(ob, rows)  # the marked row: delivered, so it may expire like any other
        publish_n(ob, 4)
        assert ob.flush()
        old = seqs_of(claim_all(ob))
        ob.close()
        ob = make(tmp_path, max_age_s=60.0, clock=lambda: now[0])
        assert ob.oldest_age_s() == 0.0
        now[0] += 30
        assert ob.oldest_age_s() == pytest.approx(30.0)
        assert ob.flush()
        assert ob.depth == 8
        now[0] += 31
        publish_n(ob, 2)
        assert ob.flush()
        assert ob.dropped() == {"max_age": 8}
        assert seqs_of(claim_all(ob)) == [old[-1] + 1, old[-1] + 2]
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
        rows = claim_all(ob)
        s0 = seqs_of(rows)[0]
        assert resets_of(rows) == [(s0, {"first": s0, "reason": "corrupt_outbox"})]
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
        publish_n(ob, 1000)  # never raises
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


def test_publish_never_touches_the_disk(tmp_path: Path) -> None:
    """publish only appends in memory: a commit in progress does not stall it."""
    ob = make(tmp_path)
    try:
        with ob.holding_db():  # hold the database as a long commit would
            for cam in ("cam0", "cam1"):  # cameras the file has never seen, too
                publish_n(ob, 1000, cam)
        assert ob.flush()
        assert ob.depth == 2000
    finally:
        ob.close()
