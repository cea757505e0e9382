"""Fault tests of the outbox with real processes and real faults.

- the agent process (real Outbox + MqttLink + Drain) ``kill -9``ed at 20 random points and
  stopped with SIGTERM 10 times, judged by an independent ledger of what a subscriber received:
  no seq missing, none reused, first arrivals in order, duplicates bounded, and after every
  SIGTERM no acknowledged row left in the file;
- the outbox file deleted between two runs: one explicit reset per camera, no gap;
- the real ``edge-agent run`` stopped with SIGTERM and started again: no acknowledged row left,
  one series, no gap, no duplicate;
- a long outage against a 4 MiB disk budget, under both policies;
- a disk that fills up (a real tmpfs mounted for the test).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
from pathlib import Path

import orjson
import pytest

from edge_agent.config import MqttSettings, OutboxSettings
from edge_agent.outbox.facade import Outbox
from edge_agent.transport.drain import Drain
from edge_agent.transport.link import MqttLink
from hub.client.results import Gap, Reset, ResultSubscriber
from tests.support.agent_process import AgentProcess, agent_config
from tests.support.broker import CONSUMER, Broker, Publishers
from tests.support.mqtt_recorder import Recorder
from tests.support.outbox_driver import mqtt_args
from tests.support.outbox_faults import Ledger, Zygote, leftover_rows

pytestmark = [pytest.mark.slow, pytest.mark.fault]

KILLS = 20
TERMS = 10
NODE = "node-k"
#: What a crash can duplicate: the messages on the wire without PUBACK (paho resends them:
#: ``mqtt.max_inflight``) and the rows acknowledged in the last commit interval (their delete
#: was not committed yet). The drain's window (4 x max_inflight handed to paho) bounds both at
#: the driver's rate (5 ms commits).
WINDOW = 4 * MqttSettings().max_inflight


def results(rec: Recorder) -> list[bytes]:
    """The result payloads the recorder received, in arrival order (fences left out)."""
    return [p for t, p, _ in list(rec.messages) if "/results/" in t and not t.endswith("/fence")]


def fence(rec: Recorder, pub: Publishers, prefix: str, n: int, node: str = NODE) -> None:
    """Wait until everything the broker took before now has reached the recorder.

    A broker queues a subscriber's messages in the order it took them, so once a message
    published now arrives, every result the broker acknowledged earlier has arrived too.
    """
    topic = f"{prefix}/{node}/results/fence"
    pub.publish(topic, b"%d" % n)
    rec.wait(lambda: any(t == topic and p == b"%d" % n for t, p, _ in list(rec.messages)), 20,
             f"fence {n}")


def test_agent_kill9_and_sigterm_leave_no_gap_and_no_acknowledged_row(
    broker: Broker, topic_prefix: str, tmp_path: Path
) -> None:
    """20 kill -9 at random points and 10 SIGTERM restarts, two cameras: the ledger sees no
    gap, no reused seq, first arrivals in order, duplicates within the window; every committed
    result arrives; after each SIGTERM the file holds no row the broker had acknowledged."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    db = tmp_path / "outbox.sqlite3"
    rec = Recorder(broker, [f"{topic_prefix}/+/results/+"]).start()
    pub = Publishers(broker)
    zyg = Zygote(tmp_path / "driver.stderr")
    # two cameras at 100 results/s each, commits every 5 ms: runs of 0.05 to 1 s
    argv = ["--db", str(db), *mqtt_args(broker.settings(NODE)), "--prefix", topic_prefix,
            "--node", NODE, "--batch", "10", "--commit-ms", "5", "--fps", "100"]
    plan = ["kill"] * KILLS + ["term"] * TERMS
    rng.shuffle(plan)
    pid = None
    left_after_term: list[set[tuple[str, int]]] = []
    try:
        for i, action in enumerate(plan):
            start = len(zyg.snapshot())
            pid = zyg.spawn(argv)
            # a SIGTERM right after a commit finds the drain about to send the new rows
            kind = rng.choice(["committed", "issued", "ready"] if action == "kill" else
                              ["committed"])
            if kind != "ready":
                zyg.wait_for(pid, kind, 20, start=start, count=rng.randint(1, 20))
            if action == "kill":
                os.kill(pid, signal.SIGKILL)
                continue
            os.kill(pid, signal.SIGTERM)
            ended = zyg.wait_for(pid, "exit", 30, start=start)
            assert ended["exit"] == 0, f"the driver failed (seed {seed})"
            left = leftover_rows(db)
            fence(rec, pub, topic_prefix, i)
            acked_and_left = left & Ledger.of(results(rec)).received()
            assert not acked_and_left, (
                f"after SIGTERM the file still holds {len(acked_and_left)} rows the subscriber "
                f"received: {sorted(acked_and_left)[:5]} (seed {seed})")
            left_after_term.append(left)
        pid = zyg.spawn(argv)  # the survivor delivers what the others left
        events = zyg.snapshot()
        committed = {(c, x) for e in events for c, x in e.get("committed", [])}
        assert len(committed) > KILLS + TERMS, "the drivers committed almost nothing"

        def all_arrived() -> bool:
            got = {(str(o["camera"]), str(o["x"])) for o in map(orjson.loads, results(rec))}
            return committed <= got

        rec.wait(all_arrived, 60, "every committed result")
    finally:
        zyg.close(pid)
        pub.close()
        rec.stop()

    led = Ledger.of(results(rec))
    assert led.cameras() == ["cam0", "cam1"]
    for cam in led.cameras():
        assert led.missing(cam) == [], f"{cam}: seqs missing (seed {seed})"
        assert led.resets(cam) == 0, f"{cam}: {led.series(cam)} (seed {seed})"
    assert led.reused() == [], f"a seq was given to two results (seed {seed})"
    assert led.out_of_order() == [], f"first arrivals out of order (seed {seed})"
    assert led.duplicates() <= KILLS * WINDOW, f"{led.duplicates()} duplicates (seed {seed})"
    print(f"ledger: {len(led.arrivals)} arrivals, {len(led.received())} distinct, "
          f"{led.duplicates()} duplicates over {KILLS} kills, rows left after SIGTERM: "
          f"{[len(x) for x in left_after_term]} (seed {seed})")


def test_a_deleted_outbox_is_one_explicit_reset_not_a_gap(
    broker: Broker, topic_prefix: str, tmp_path: Path
) -> None:
    """Run, stop, delete the outbox file, run again: the subscriber (the ledger and the hub's
    consumer) sees one reset per camera and no gap."""
    db = tmp_path / "outbox.sqlite3"
    rec = Recorder(broker, [f"{topic_prefix}/+/results/+"]).start()
    gaps: list[Gap] = []
    resets: list[Reset] = []
    sub = ResultSubscriber(**broker.settings(CONSUMER), topic_prefix=topic_prefix,
                           on_gap=gaps.append, on_reset=resets.append).start()
    zyg = Zygote(tmp_path / "driver.stderr")
    argv = ["--db", str(db), *mqtt_args(broker.settings(NODE)), "--prefix", topic_prefix,
            "--node", NODE, "--batch", "10", "--commit-ms", "5", "--max-batches", "20"]
    pid = None
    try:
        for run in range(2):
            start = len(zyg.snapshot())
            pid = zyg.spawn(argv)
            zyg.wait_for(pid, "committed", 20, start=start, count=20)

            def delivered(target: int = 200 * (run + 1)) -> bool:
                return len(Ledger.of(results(rec)).received()) >= target

            rec.wait(delivered, 30, f"run {run}'s results")
            os.kill(pid, signal.SIGTERM)
            zyg.wait_for(pid, "exit", 30, start=start)
            pid = None
            if run == 0:
                for f in tmp_path.glob("outbox.sqlite3*"):
                    f.unlink()
        got = 0
        while got < 400:
            r = sub.get(timeout=10)
            assert r is not None, f"the consumer got {got} of 400"
            got += 1
    finally:
        zyg.close(pid)
        sub.close()
        rec.stop()
    led = Ledger.of(results(rec))
    for cam in ("cam0", "cam1"):
        assert led.resets(cam) == 1 and led.missing(cam) == [], led.series(cam)
        assert [r for _, r in led.markers[cam]] == ["new_outbox", "new_outbox"]
    assert gaps == []
    assert sorted((r.camera, r.reason) for r in resets) == [
        ("cam0", "new_outbox"), ("cam1", "new_outbox")]
    assert (sub.stats.resets, sub.stats.gaps, sub.stats.missing) == (2, 0, 0)


def test_a_real_agent_stopped_with_sigterm_goes_on_without_gap_or_duplicate(
    broker: Broker, topic_prefix: str, tmp_path: Path, models_dir: Path
) -> None:
    """``edge-agent run`` (a 20 fps test camera, results over MQTT) stopped with SIGTERM and
    started again, three times: after each stop the file holds no acknowledged row; the
    subscriber sees one series, no gap, no duplicate."""
    node = "node-real"
    db = tmp_path / "outbox.sqlite3"
    cfg = agent_config(
        tmp_path, models_dir, node=node,
        cameras=[{"name": "cam-a", "url": "test://pattern?width=64&height=64&fps=20",
                  "model": "tiny-classifier"}],
        pipeline={"sink": "mqtt"}, outbox={"path": str(db)},
        mqtt={**broker.settings(node), "topic_prefix": topic_prefix})
    rec = Recorder(broker, [f"{topic_prefix}/+/results/+"]).start()
    pub = Publishers(broker)
    try:
        for run in range(3):
            agent = AgentProcess(tmp_path, cfg).start("/readyz")
            try:
                def enough(target: int = len(results(rec)) + 20) -> bool:
                    return len(results(rec)) >= target

                rec.wait(enough, 30, f"run {run}'s results")
            finally:
                rc = agent.stop()  # SIGTERM, then waits
            assert rc == 0, agent.log_text()[-3000:]
            left = leftover_rows(db)
            fence(rec, pub, topic_prefix, run, node)
            assert not left & Ledger.of(results(rec)).received(), "acknowledged rows left"
    finally:
        pub.close()
        rec.stop()
    led = Ledger.of(results(rec))
    assert led.cameras() == ["cam-a"]
    assert led.missing("cam-a") == [] and led.resets("cam-a") == 0, led.series("cam-a")
    assert led.duplicates() == 0 and led.out_of_order() == [] and led.reused() == []
    assert [r for _, r in led.markers["cam-a"]] == ["new_outbox"]


def detection_result(node: str, camera: str, i: int) -> dict[str, object]:
    """A realistic detection result (~600 bytes serialized)."""
    dets = [{"cls": k, "label": "person", "score": 0.9 - k / 100,
             "box": [0.1 + k / 50, 0.2, 0.3 + k / 50, 0.4]} for k in range(5)]
    return {"v": 1, "node": node, "camera": camera, "ts": 1700000000.0 + i,
            "model": {"name": "yolo", "version": "1.0.0"}, "task": "yolo",
            "frame": {"width": 1920, "height": 1080},
            "latency_ms": {"preprocess": 1.2, "inference": 8.5, "postprocess": 0.7,
                           "end_to_end": 11.0},
            "detections": dets}


async def _drain_to(broker: Broker, outbox: Outbox, prefix: str, node: str,
                    rec: Recorder, expect: int) -> None:
    """End the outage: connect, drain, wait until ``expect`` results arrived and depth is 0."""
    link = MqttLink(MqttSettings(**broker.settings(node), topic_prefix=prefix), node)
    await link.start()
    drain = Drain(outbox, link)
    drain.start()
    try:
        await asyncio.to_thread(rec.wait, lambda: rec.count() >= expect, 60, "drained results")
        # the subscriber may have a message before the agent has its PUBACK
        assert await asyncio.to_thread(drain.wait_acked, expect, 30)
        assert await outbox.aflush()
        assert outbox.depth == 0
    finally:
        await drain.aclose()
        await link.aclose()


BUDGET = 4 * 1024 * 1024


@pytest.mark.parametrize("policy", ["drop-oldest", "reject-new"])
async def test_outage_with_4mib_budget(
    broker: Broker, topic_prefix: str, tmp_path: Path, policy: str
) -> None:
    """3x the budget offered during an outage: disk within budget + 10 %, drops exact."""
    settings = OutboxSettings(path=tmp_path / "outbox.sqlite3", max_bytes=BUDGET,
                              policy=policy, commit_interval_ms=20)
    outbox = await Outbox(settings, topic_prefix=topic_prefix).aopen()
    rec = Recorder(broker, [f"{topic_prefix}/+/results/+"]).start()
    total = 20_000
    peak = 0
    try:
        for i in range(total):
            outbox.publish(detection_result("node-b", "cam0", i))
            if i % 1000 == 999:
                assert await outbox.aflush()
                peak = max(peak, outbox.disk_bytes())
        assert await outbox.aflush()
        peak = max(peak, outbox.disk_bytes())
        assert not await asyncio.to_thread(Path(str(settings.path) + "-shm").exists)
        assert peak <= BUDGET * 1.1, f"disk use {peak} over budget {BUDGET} + 10 %"
        dropped = outbox.dropped()
        depth = outbox.depth
        assert set(dropped) == {"max_bytes"}
        assert depth + dropped["max_bytes"] == total, "a result vanished uncounted"
        assert depth > 4000, "the budget kept too little"  # ~600 B results in 4 MiB
        assert outbox.bytes_used() <= BUDGET
        await _drain_to(broker, outbox, topic_prefix, "node-b", rec, depth)
    finally:
        await outbox.aclose()
        rec.stop()
    led = Ledger.of(results(rec))
    (first, _), = led.series("cam0")
    got = sorted(led.seqs("cam0"))
    # every result took its seq, dropped or not; drop-oldest kept the newest and the first
    # (it carries the series' reset marker, so it stays until delivered)
    seqs = list(range(first, first + total))
    expected = [first, *seqs[total - depth + 1:]] if policy == "drop-oldest" else seqs[:depth]
    assert got == expected


def _mount_tmpfs(where: Path, size: str) -> None:
    where.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}); "
                    "the disk-full test needs root or CAP_SYS_ADMIN")


@pytest.mark.parametrize("policy", ["drop-oldest", "reject-new"])
async def test_disk_full_on_tmpfs_keeps_running(
    broker: Broker, topic_prefix: str, tmp_path: Path, policy: str
) -> None:
    """ENOSPC: no exception, results held in memory (bounded, drops counted), then recovery."""
    mnt = tmp_path / "mnt"
    await asyncio.to_thread(_mount_tmpfs, mnt, "2m")
    try:
        filler = mnt / "filler"
        filler.write_bytes(b"\0" * (1536 * 1024))  # leave ~0.5 MiB for the outbox
        settings = OutboxSettings(path=mnt / "outbox.sqlite3", commit_interval_ms=10,
                                  max_pending_bytes=256 * 1024,
                                  policy=policy)
        outbox = await Outbox(settings, topic_prefix=topic_prefix).aopen()
        rec = Recorder(broker, [f"{topic_prefix}/+/results/+"]).start()
        try:
            n = 0
            while not outbox.stats.disk_full:
                assert n < 20_000, "the disk never filled up"
                for _ in range(200):
                    outbox.publish(detection_result("node-f", "cam0", n))
                    n += 1
                await outbox.aflush()
            for _ in range(2000):  # more than max_pending_bytes while the disk is full
                outbox.publish(detection_result("node-f", "cam0", n))
                n += 1
            assert not await outbox.aflush()
            dropped = outbox.dropped()
            assert dropped.get("disk_full", 0) > 0, dropped
            assert outbox.stats.commit_errors > 0
            assert outbox.depth + sum(dropped.values()) == n
            filler.unlink()  # space comes back
            assert await outbox.aflush()
            assert not outbox.stats.disk_full
            depth = outbox.depth
            assert depth + sum(outbox.dropped().values()) == n
            await _drain_to(broker, outbox, topic_prefix, "node-f", rec, depth)
            assert len({r["seq"] for r in rec.results()}) == depth
        finally:
            await outbox.aclose()
            rec.stop()
    finally:
        await asyncio.to_thread(subprocess.run, ["umount", "-l", str(mnt)], check=False)
