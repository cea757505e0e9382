"""Outbox speed: append rate, and drain rate after an outage against bare paho QoS 1.

    .venv/bin/python bench/outbox.py [--quick] [--against TREE]

- ``append``: ``Outbox.publish`` of realistic detection results (~600 bytes, 3 cameras) as
  fast as one thread can, until the last one is committed (``flush``): results per second
  into the SQLite file, commits included (seqs, given at commit, too), not just the
  in-memory append. ``publish_over_bare``: the ``publish`` call against its floor measured in
  the same run, ``encode_dict`` of the same results and a deque append.
- ``--against TREE``: another checkout of this project (e.g. the previous commit:
  ``git archive HEAD | tar -x -C /tmp/base``). The append measurement then runs in fresh
  processes, alternating this tree and TREE over several rounds; ``append_vs_against`` and
  ``publish_vs_against`` are medians of the per-round ratios (this / TREE), so a noisy
  neighbour hurts both sides alike; ``cpu_vs_against`` compares the CPU time of all threads
  per result (commits included), which neighbours move least.
- ``drain``: an outbox filled while no broker was reachable is connected to a real Mosquitto
  started by this script; results per second until every one is acknowledged (PUBACK) and
  its row deleted.
- ``paho``: the baseline, measured in the same run against the same broker: a bare paho
  client publishing the same payloads on the same topics at QoS 1 with the same in-flight
  window, until every PUBACK arrived.

Drain and paho alternate over several rounds so a noisy neighbour hurts both alike; the
ratio is the median of the per-round ratios (each round's pair ran back to back). ``--tls``
runs both over TLS with client certificates and the production ACL (as deployed). Writes
``bench/out/outbox.json`` (``outbox-tls.json`` with ``--tls``); the last line is
``append_per_s=... publish_us=... publish_over_bare=... drain_per_s=... drain_over_paho=...``
(and ``append_vs_against=... publish_vs_against=...`` with ``--against``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import structlog  # noqa: E402
from paho.mqtt.enums import MQTTProtocolVersion  # noqa: E402

from edge_agent.config import MqttSettings, OutboxSettings  # noqa: E402
from edge_agent.contract.protocol import encode_dict, results_topic  # noqa: E402
from edge_agent.outbox.facade import Outbox  # noqa: E402
from edge_agent.transport.drain import Drain  # noqa: E402
from edge_agent.transport.link import MqttLink  # noqa: E402
from tests.support.broker import Broker  # noqa: E402

CAMERAS = ("cam0", "cam1", "cam2")
NODE = "bench-node"
PREFIX = "bench"
WINDOW = 100


def detection(camera: str, i: int) -> dict[str, Any]:
    """A realistic detection result without seq (~600 bytes serialized)."""
    dets = [{"cls": k, "label": "person", "score": 0.9 - k / 100,
             "box": [0.1 + k / 50, 0.2, 0.3 + k / 50, 0.4]} for k in range(5)]
    return {"v": 1, "node": NODE, "camera": camera, "ts": 1.7e9 + i / 30,
            "model": {"name": "yolo", "version": "1.0.0"}, "task": "yolo",
            "frame": {"width": 1920, "height": 1080},
            "latency_ms": {"preprocess": 1.2, "inference": 8.5, "postprocess": 0.7,
                           "end_to_end": 11.0},
            "detections": dets}


def append_rate(n: int, workdir: Path) -> dict[str, float]:
    """Results per second from the first publish to the last commit."""
    settings = OutboxSettings(path=workdir / "append.sqlite3",
                              max_pending_bytes=1024 * 1024 * 1024)
    outbox = Outbox(settings, topic_prefix=PREFIX).open()
    results = [detection(CAMERAS[i % 3], i) for i in range(n)]
    c0, t0 = time.process_time(), time.perf_counter()
    for r in results:
        outbox.publish(r)
    t1 = time.perf_counter()
    ok = outbox.flush(timeout=600)
    c2, t2 = time.process_time(), time.perf_counter()
    assert ok and outbox.depth == n and not outbox.dropped(), outbox.dropped()
    disk = outbox.disk_bytes()
    outbox.close()
    bare = bare_publish_us([detection(CAMERAS[i % 3], i) for i in range(n)])
    publish_us = (t1 - t0) / n * 1e6
    return {"results": n, "append_per_s": n / (t2 - t0), "publish_call_per_s": n / (t1 - t0),
            "publish_us": publish_us, "bare_us": bare, "publish_over_bare": publish_us / bare,
            "cpu_us_per_result": (c2 - c0) / n * 1e6,
            "disk_bytes_per_result": disk / n}


def bare_publish_us(results: list[dict[str, Any]]) -> float:
    """The floor of a ``publish`` call: serialize the same result and append it to a deque."""
    pending: collections.deque[bytes] = collections.deque()
    t0 = time.perf_counter()
    for r in results:
        pending.append(encode_dict(r))
    return (time.perf_counter() - t0) / len(results) * 1e6


#: One append measurement in a fresh process, on the checkout in argv[1] (``--against``): only
#: the calls every version of ``Outbox`` has (``seq`` assigned in publish or at commit).
WORKER = """
import json, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import structlog
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
from edge_agent.config import OutboxSettings
from edge_agent.outbox.facade import Outbox
sys.path.insert(0, sys.argv[2])
from bench_outbox_detection import detection
n = int(sys.argv[3])
cams = ("cam0", "cam1", "cam2")
with tempfile.TemporaryDirectory() as tmp:
    settings = OutboxSettings(path=Path(tmp) / "a.sqlite3", max_pending_bytes=1 << 30)
    try:  # the block-reserving version reserved for the configured cameras at open
        ob = Outbox(settings, topic_prefix="bench", cameras=cams).open()
    except TypeError:
        ob = Outbox(settings, topic_prefix="bench").open()
    results = [detection(cams[i % 3], i) for i in range(n)]
    c0, t0 = time.process_time(), time.perf_counter()
    for r in results:
        ob.publish(r)
    t1 = time.perf_counter()
    assert ob.flush(timeout=600) and ob.depth == n
    c2, t2 = time.process_time(), time.perf_counter()
    ob.close()
print(json.dumps({"append_per_s": n / (t2 - t0), "publish_us": (t1 - t0) / n * 1e6,
                  "cpu_us": (c2 - c0) / n * 1e6}))
"""


def against(tree: Path, n: int, rounds: int, workdir: Path) -> dict[str, Any]:
    """Append rate and publish time of this tree and ``tree``, alternating fresh processes."""
    shim = workdir / "shim"
    shim.mkdir()
    # the same result builder for both trees (this file's), importable without our imports
    src = Path(__file__).read_text()
    start = src.index("def detection(")
    end = src.index("def append_rate(")
    (shim / "bench_outbox_detection.py").write_text(
        "from typing import Any\nNODE = " + repr(NODE) + "\n" + src[start:end])

    def one(where: Path) -> dict[str, float]:
        out = subprocess.run([sys.executable, "-c", WORKER, str(where), str(shim), str(n)],
                             capture_output=True, text=True, check=True, timeout=600)
        return dict(json.loads(out.stdout.strip().splitlines()[-1]))

    ours: list[dict[str, float]] = []
    theirs: list[dict[str, float]] = []
    for r in range(rounds):
        for side in (["ours", "theirs"] if r % 2 == 0 else ["theirs", "ours"]):
            if side == "ours":
                ours.append(one(ROOT))
            else:
                theirs.append(one(tree))
    pairs = list(zip(ours, theirs, strict=True))
    return {
        "tree": str(tree), "results": n, "rounds": rounds, "ours": ours, "theirs": theirs,
        "append_vs_against": statistics.median(a["append_per_s"] / b["append_per_s"]
                                               for a, b in pairs),
        "publish_vs_against": statistics.median(a["publish_us"] / b["publish_us"]
                                                for a, b in pairs),
        # CPU time of all threads per result: what the change costs, least moved by neighbours
        "cpu_vs_against": statistics.median(a["cpu_us"] / b["cpu_us"] for a, b in pairs),
    }


def fill(path: Path, n: int) -> Outbox:
    """An outbox holding ``n`` results, as after an outage."""
    outbox = Outbox(OutboxSettings(path=path, max_pending_bytes=1024 * 1024 * 1024),
                    topic_prefix=PREFIX).open()
    for i in range(n):
        outbox.publish(detection(CAMERAS[i % 3], i))
    assert outbox.flush(timeout=600)
    return outbox


async def drain_rate(broker: Broker, outbox: Outbox, n: int) -> float:
    """Results per second from connecting until every row is acknowledged."""
    link = MqttLink(MqttSettings(**broker.settings(NODE), topic_prefix=PREFIX,
                                 max_inflight=WINDOW),
                    NODE,
                    client_id=f"bench-drain-{time.monotonic_ns()}")
    await link.start()
    await link.wait_connected(10)
    drain = Drain(outbox, link)
    t0 = time.perf_counter()
    drain.start()
    assert await asyncio.to_thread(drain.wait_acked, n, 600)
    dt = time.perf_counter() - t0
    await drain.aclose()
    await link.aclose()
    return n / dt


def paho_rate(broker: Broker, payloads: list[tuple[str, bytes]]) -> float:
    """Bare paho: QoS 1 publishes of the same messages, same window, until all PUBACKs."""
    done = threading.Event()
    acked = [0]
    n = len(payloads)

    def on_publish(*_: Any) -> None:
        acked[0] += 1
        if acked[0] >= n:
            done.set()

    # the same identity, certificate and TLS settings as the drain's link (when --tls)
    c = broker.client(NODE, client_id=f"bench-paho-{time.monotonic_ns()}",
                      protocol=MQTTProtocolVersion.MQTTv5)
    c.max_inflight_messages_set(WINDOW)
    c.max_queued_messages_set(0)
    c.on_publish = on_publish
    broker.connect(c)
    c.loop_start()
    t0 = time.perf_counter()
    for topic, payload in payloads:
        c.publish(topic, payload, qos=1)
    done.wait(600)
    dt = time.perf_counter() - t0
    c.disconnect()
    c.loop_stop()
    return n / dt


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller runs (under 60 s)")
    ap.add_argument("--against", type=Path, metavar="TREE",
                    help="another checkout of this project to compare the append with "
                    "(e.g. the previous commit, exported with git archive)")
    ap.add_argument("--tls", action="store_true",
                    help="drain and bare paho both over TLS with client certificates and the "
                    "production ACL (the default is plain MQTT: the drain's own cost over paho)")
    args = ap.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    n_append = 100_000 if args.quick else 300_000
    n_drain = 20_000 if args.quick else 50_000
    rounds = 3 if args.quick else 5
    load_before = loadavg()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-outbox-") as tmp:
        work = Path(tmp)
        append = append_rate(n_append, work)
        print(f"append: {append['append_per_s']:,.0f} results/s committed "
              f"(publish call {append['publish_us']:.2f} us, "
              f"{append['publish_over_bare']:.2f}x its floor)", flush=True)
        compared = None
        if args.against is not None:
            # more, smaller rounds than the drain's: fresh processes are noisier
            compared = against(args.against, n_append // 4, rounds + 2, work)
            print(f"against {args.against}: append {compared['append_vs_against']:.2f}x, "
                  f"publish call {compared['publish_vs_against']:.2f}x, CPU per result "
                  f"{compared['cpu_vs_against']:.2f}x", flush=True)
        (work / "broker").mkdir()
        # plain MQTT by default: the ratio is the drain's own cost over paho's; with --tls both
        # pay the same encryption per byte, as deployed
        broker = Broker(work / "broker", persistence=False, tls=args.tls)
        broker.start()
        try:
            drains: list[float] = []
            pahos: list[float] = []
            for r in range(rounds):
                outbox = fill(work / f"drain{r}.sqlite3", n_drain)
                # the same bytes the drain sends, read back from the outbox file
                rows = outbox.claim(n_drain, timeout=1.0)
                outbox.close()
                payloads = [(t, p) for _, t, p in rows]
                outbox = Outbox(OutboxSettings(path=work / f"drain{r}.sqlite3"),
                                topic_prefix=PREFIX).open()
                order = ["drain", "paho"] if r % 2 == 0 else ["paho", "drain"]
                for which in order:
                    if which == "drain":
                        drains.append(asyncio.run(drain_rate(broker, outbox, n_drain)))
                    else:
                        pahos.append(paho_rate(broker, payloads))
                outbox.close()
                print(f"round {r}: drain {drains[-1]:,.0f}/s, paho {pahos[-1]:,.0f}/s",
                      flush=True)
        finally:
            broker.stop()
    drain_med = statistics.median(drains)
    paho_med = statistics.median(pahos)
    # paired per round (drain and paho ran back to back), so slow drift cancels out
    ratio = statistics.median(d / p for d, p in zip(drains, pahos, strict=True))
    out = {
        "quick": args.quick,
        "tls": args.tls,
        "append": append,
        "against": compared,
        "drain": {"results": n_drain, "rounds": drains, "median_per_s": drain_med},
        "paho": {"results": n_drain, "rounds": pahos, "median_per_s": paho_med},
        "drain_over_paho": ratio,
        "drain_over_paho_of_medians": drain_med / paho_med,
        "window": WINDOW,
        "payload_bytes": len(encode_dict({**detection("cam0", 0), "seq": 1 << 50})),
        "topic": results_topic(PREFIX, NODE, "cam0"),
        "cpus": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "seconds": time.perf_counter() - t_start,
    }
    (ROOT / "bench" / "out").mkdir(parents=True, exist_ok=True)
    name = "outbox-tls.json" if args.tls else "outbox.json"
    (ROOT / "bench" / "out" / name).write_text(json.dumps(out, indent=2) + "\n")
    print(f"loadavg before: {load_before}; after: {out['loadavg_after']}")
    tail = ""
    if compared is not None:
        tail = (f" append_vs_against={compared['append_vs_against']:.2f}"
                f" publish_vs_against={compared['publish_vs_against']:.2f}"
                f" cpu_vs_against={compared['cpu_vs_against']:.2f}")
    print(f"append_per_s={append['append_per_s']:.0f} publish_us={append['publish_us']:.2f} "
          f"publish_over_bare={append['publish_over_bare']:.2f} drain_per_s={drain_med:.0f} "
          f"drain_over_paho={out['drain_over_paho']:.2f}{tail}")


if __name__ == "__main__":
    main()
