"""Outbox speed: append rate, and drain rate after an outage against bare paho QoS 1.

    .venv/bin/python bench/outbox.py [--quick]

- ``append``: ``Outbox.publish`` of realistic detection results (~600 bytes, 3 cameras) as
  fast as one thread can, until the last one is committed (``flush``): results per second
  into the SQLite file, commits included (not just the in-memory append).
- ``drain``: an outbox filled while no broker was reachable is connected to a real Mosquitto
  started by this script; results per second until every one is acknowledged (PUBACK) and
  its row deleted.
- ``paho``: the baseline, measured in the same run against the same broker: a bare paho
  client publishing the same payloads on the same topics at QoS 1 with the same in-flight
  window, until every PUBACK arrived.

Drain and paho alternate over several rounds so a noisy neighbour hurts both alike; the
ratio is the median of the per-round ratios (each round's pair ran back to back). Writes
``bench/out/outbox.json``; the last line is
``append_per_s=... drain_per_s=... drain_over_paho=...``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import paho.mqtt.client as paho  # noqa: E402
import structlog  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion  # noqa: E402

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
    outbox = Outbox(settings, topic_prefix=PREFIX, cameras=CAMERAS).open()
    results = [detection(CAMERAS[i % 3], i) for i in range(n)]
    t0 = time.perf_counter()
    for r in results:
        outbox.publish(r)
    t1 = time.perf_counter()
    ok = outbox.flush(timeout=600)
    t2 = time.perf_counter()
    assert ok and outbox.depth == n and not outbox.dropped(), outbox.dropped()
    disk = outbox.disk_bytes()
    outbox.close()
    return {"results": n, "append_per_s": n / (t2 - t0), "publish_call_per_s": n / (t1 - t0),
            "publish_us": (t1 - t0) / n * 1e6, "disk_bytes_per_result": disk / n}


def fill(path: Path, n: int) -> Outbox:
    """An outbox holding ``n`` results, as after an outage."""
    outbox = Outbox(OutboxSettings(path=path, max_pending_bytes=1024 * 1024 * 1024),
                    topic_prefix=PREFIX, cameras=CAMERAS).open()
    for i in range(n):
        outbox.publish(detection(CAMERAS[i % 3], i))
    assert outbox.flush(timeout=600)
    return outbox


async def drain_rate(port: int, outbox: Outbox, n: int) -> float:
    """Results per second from connecting until every row is acknowledged."""
    link = MqttLink(MqttSettings(port=port, topic_prefix=PREFIX, max_inflight=WINDOW), NODE,
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


def paho_rate(port: int, payloads: list[tuple[str, bytes]]) -> float:
    """Bare paho: QoS 1 publishes of the same messages, same window, until all PUBACKs."""
    done = threading.Event()
    acked = [0]
    n = len(payloads)

    def on_publish(*_: Any) -> None:
        acked[0] += 1
        if acked[0] >= n:
            done.set()

    c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                    client_id=f"bench-paho-{time.monotonic_ns()}",
                    protocol=MQTTProtocolVersion.MQTTv5)
    c.max_inflight_messages_set(WINDOW)
    c.max_queued_messages_set(0)
    c.on_publish = on_publish
    c.connect("127.0.0.1", port)
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
              f"(publish call {append['publish_us']:.1f} us)", flush=True)
        (work / "broker").mkdir()
        broker = Broker(work / "broker", persistence=False)
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
                        drains.append(asyncio.run(drain_rate(broker.port, outbox, n_drain)))
                    else:
                        pahos.append(paho_rate(broker.port, payloads))
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
        "append": append,
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
    (ROOT / "bench" / "out" / "outbox.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"loadavg before: {load_before}; after: {out['loadavg_after']}")
    print(f"append_per_s={append['append_per_s']:.0f} drain_per_s={drain_med:.0f} "
          f"drain_over_paho={out['drain_over_paho']:.2f}")


if __name__ == "__main__":
    main()
