"""Fault tests of the outbox with real processes and real faults.

- the agent process (real Outbox + MqttLink + Drain) ``kill -9``ed at 20 random points;
- a long outage against a 4 MiB disk budget, under both policies;
- a disk that fills up (a real tmpfs mounted for the test).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
from collections import defaultdict
from pathlib import Path

import orjson
import pytest

from edge_agent.config import MqttSettings, OutboxSettings
from edge_agent.outbox.facade import Outbox
from edge_agent.transport.drain import Drain
from edge_agent.transport.link import MqttLink
from tests.support.broker import Broker
from tests.support.mqtt_recorder import Recorder
from tests.support.outbox_faults import Zygote

pytestmark = [pytest.mark.slow, pytest.mark.fault]

KILLS = 20


def _seqs(rec: Recorder) -> dict[tuple[str, int], set[bytes]]:
    """(camera, seq) -> the distinct payloads received for it (as canonical JSON)."""
    out: dict[tuple[str, int], set[bytes]] = defaultdict(set)
    for obj in rec.results():
        key = (str(obj["camera"]), int(obj["seq"]))  # type: ignore[call-overload]
        out[key].add(orjson.dumps(obj, option=orjson.OPT_SORT_KEYS))
    return out


def test_agent_kill9_at_random_points_loses_nothing_committed(
    broker: Broker, topic_prefix: str, tmp_path: Path
) -> None:
    """kill -9 the agent 20 times: every committed result arrives, no seq is handed out twice."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    rec = Recorder(broker.port, [f"{topic_prefix}/+/results/+"]).start()
    zyg = Zygote(tmp_path / "driver.stderr")
    argv = ["--db", str(tmp_path / "outbox.sqlite3"), "--port", str(broker.port),
            "--prefix", topic_prefix, "--node", "node-k", "--batch", "10", "--commit-ms", "5"]
    pid = None
    try:
        for _ in range(KILLS):
            start = len(zyg.snapshot())
            pid = zyg.spawn(argv)
            kind = rng.choice(["committed", "issued", "ready"])
            if kind != "ready":
                def match(e: dict[str, object], k: str = kind, p: int = pid) -> bool:
                    return e.get("pid") == p and k in e
                zyg.wait(match, 20, start=start, count=rng.randint(1, 6))
            os.kill(pid, signal.SIGKILL)
        pid = zyg.spawn(argv)  # the survivor delivers what the killed ones left
        events = zyg.snapshot()
        committed = {(c, s) for e in events for c, s in e.get("committed", [])}
        assert len(committed) > KILLS, "the drivers committed almost nothing"
        rec.wait(lambda: committed <= set(_seqs(rec)), 60, "every committed result")
    finally:
        zyg.close(pid)
        rec.stop()

    events = zyg.snapshot()
    issued = [(c, s) for e in events for c, s in e.get("issued", [])]
    assert len(issued) == len(set(issued)), f"a seq was handed out twice (seed {seed})"
    received = _seqs(rec)
    reused = {k: v for k, v in received.items() if len(v) > 1}
    assert not reused, f"seqs reused with different payloads: {list(reused)[:5]} (seed {seed})"
    missing = committed - set(received)
    assert not missing, f"{len(missing)} committed results never arrived (seed {seed})"
    # each process starts above every seq any earlier process handed out, per camera
    by_pid: dict[int, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    order: list[int] = []
    for e in events:
        if "issued" in e:
            if e["pid"] not in by_pid:
                order.append(e["pid"])
            for c, s in e["issued"]:
                by_pid[e["pid"]][c].append(s)
    high: dict[str, int] = {}
    for p in order:
        for c, seqs in by_pid[p].items():
            assert seqs == sorted(seqs)
            assert min(seqs) > high.get(c, -1), (
                f"seq went back for {c}: pid {p} issued {seqs[:3]}.. after {high.get(c)} "
                f"(seed {seed})")
            high[c] = max(seqs)


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
    link = MqttLink(MqttSettings(port=broker.port, topic_prefix=prefix), node)
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
                              policy=policy, commit_interval_ms=20)  # type: ignore[arg-type]
    outbox = await Outbox(settings, topic_prefix=topic_prefix).aopen()
    rec = Recorder(broker.port, [f"{topic_prefix}/+/results/+"]).start()
    issued: list[int] = []
    peak = 0
    try:
        for i in range(20_000):
            issued.append(outbox.publish(detection_result("node-b", "cam0", i)))
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
        assert depth + dropped["max_bytes"] == len(issued), "a result vanished uncounted"
        assert depth > 4000, "the budget kept too little"  # ~600 B results in 4 MiB
        assert outbox.bytes_used() <= BUDGET
        await _drain_to(broker, outbox, topic_prefix, "node-b", rec, depth)
    finally:
        await outbox.aclose()
        rec.stop()
    got = sorted({int(r["seq"]) for r in rec.results()})  # type: ignore[call-overload]
    expected = issued[-depth:] if policy == "drop-oldest" else issued[:depth]
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
                                  policy=policy)  # type: ignore[arg-type]
        outbox = await Outbox(settings, topic_prefix=topic_prefix).aopen()
        rec = Recorder(broker.port, [f"{topic_prefix}/+/results/+"]).start()
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
