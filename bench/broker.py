"""Mosquitto persistence: what each setting costs and what `kill -9` loses for an away subscriber.

    .venv/bin/python bench/broker.py [--quick] [--rate N] [--away S]

Mosquitto keeps its state (retained messages, sessions and the QoS 1 messages queued for
subscribers that are away) in memory and writes *the whole of it* to ``mosquitto.db`` at each
save: every ``autosave_interval`` seconds, or, with ``autosave_on_changes true``, every
``autosave_interval`` changes (a queued message, a delivery, a subscription), and at a clean
shutdown. A ``kill -9`` loses what was queued since the last save. This measures, for each
setting, on a real ``mosquitto`` started by this script:

- the fleet's results at ``--rate`` messages per second (QoS 1, ~600-byte results, 10 nodes x 2
  cameras) from one publisher, while a subscriber with a persistent session (MQTT 5, session
  expiry of a day, QoS 1) is away for ``--away`` seconds (7 with ``--quick``, else 20; three
  rounds without ``--quick``), so its queue grows as in an outage;
- ``publish`` latency: publish call to PUBACK, p50 / p99 / max (a save blocks the broker's one
  thread, so a large save shows up here);
- disk writes: bytes the broker process wrote (``/proc/PID/io`` ``wchar``) and saves per
  second, bytes per queued result, and what the write rate becomes when the queue is full
  (``max_queued_messages`` of the K3s config, 100,000 results): each save rewrites it all;
- loss: the broker is killed with SIGKILL at the end while results flow, started again on the
  same file, the subscriber comes back with its session: results the publisher had
  acknowledged but the subscriber never got, as a count and as seconds of results.

Settings: ``none`` (persistence off: the baseline, in the same run), ``interval_30`` (the K3s
config before issue 19), ``interval_1`` (time-based, shortest), ``changes`` (the K3s policy
now: ``autosave_on_changes true`` with ``autosave_interval`` = one second of results, here at
``--rate``; the K3s file sets 100, to be raised to a site's own rate), and ``changes_online``:
the same with a second subscriber reading live (its deliveries count as changes too, so saves
come more often). Latency ratios are against ``none``. Writes ``bench/out/broker.json``; the
last line is ``name=value`` pairs per setting (``<setting>_lost_s``, ``<setting>_write_kib_s``,
``<setting>_p99_over_none``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
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

import paho.mqtt.client as paho  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402
from paho.mqtt.subscribeoptions import SubscribeOptions  # noqa: E402

from tests.support.broker import free_port, wait_port  # noqa: E402

PREFIX = "bench"
NODES = [f"node-{i:02d}" for i in range(10)]
CAMERAS = ("cam0", "cam1")
#: ``max_queued_messages`` in k3s/base/mosquitto/mosquitto.conf: the largest queue a save writes.
K3S_MAX_QUEUED = 100_000
MOSQUITTO = "/usr/sbin/mosquitto"


def settings(rate: int) -> dict[str, tuple[list[str], bool]]:
    """The persistence lines of each setting compared, and whether a subscriber is online."""
    changes = ["persistence true", "autosave_on_changes true", f"autosave_interval {rate}"]
    return {
        "none": (["persistence false"], False),
        "interval_30": (["persistence true", "autosave_interval 30"], False),
        "interval_1": (["persistence true", "autosave_interval 1"], False),
        "changes": (changes, False),
        # a dashboard reading live beside the away subscriber: its deliveries count as changes
        "changes_online": (changes, True),
    }


def payload(seq: int, node: str, camera: str) -> bytes:
    """A realistic detection result (~600 bytes) carrying ``seq``."""
    dets = ",".join(
        f'{{"cls":{k},"label":"person","score":0.{90 - k},"box":[0.{10 + k},0.2,0.{30 + k},0.4]}}'
        for k in range(5))
    body = (f'{{"v":1,"node":"{node}","camera":"{camera}","seq":{seq},"ts":{time.time():.3f},'
            f'"model":{{"name":"detector","version":"1.4.0"}},"task":"yolo",'
            f'"frame":{{"width":1280,"height":720}},"latency_ms":{{"inference":12.5,'
            f'"preprocess":2.1,"postprocess":0.8,"end_to_end":18.2}},"detections":[{dets}]}}')
    return body.encode()


class Mosquitto:
    """A broker process with the setting's persistence lines, its file and log in ``work``."""

    def __init__(self, work: Path, lines: list[str]) -> None:
        self.work = work
        self.port = free_port()
        self.log = work / "mosquitto.log"
        conf = [
            *(["user root"] if os.geteuid() == 0 else []),
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            f"persistence_location {work}/",
            f"log_dest file {self.log}",
            "log_type error", "log_type warning", "log_type notice", "log_type information",
            "connection_messages false",
            "max_inflight_messages 100",
            f"max_queued_messages {K3S_MAX_QUEUED}",
            "max_queued_bytes 67108864",
            *lines,
        ]
        (work / "mosquitto.conf").write_text("\n".join(conf) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.work / "mosquitto.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def io(self) -> dict[str, int]:
        """The process's ``/proc/PID/io`` counters."""
        assert self.proc is not None
        text = Path(f"/proc/{self.proc.pid}/io").read_text()
        return {k: int(v) for k, v in (line.split(": ") for line in text.splitlines())}

    def saves(self) -> int:
        return len(re.findall("Saving in-memory database", self.log.read_text(errors="replace")))

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


class Ledger:
    """The independent subscriber: a persistent MQTT 5 session that records every seq."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.got: set[tuple[str, str, int]] = set()
        self.last_at = time.monotonic()
        self._lock = threading.Lock()
        self.ready = threading.Event()

    def _client(self) -> paho.Client:
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-ledger",
                        protocol=MQTTProtocolVersion.MQTTv5)
        c.on_message = self._on_message
        c.on_subscribe = lambda *_a: self.ready.set()
        c.on_connect = lambda *_a: self.ready.set()
        return c

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        body = json.loads(msg.payload)
        with self._lock:
            self.got.add((body["node"], body["camera"], body["seq"]))
            self.last_at = time.monotonic()

    def connect(self, subscribe: bool) -> paho.Client:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 86400
        c = self._client()
        self.ready.clear()
        c.connect("127.0.0.1", self.port, clean_start=False, properties=props)
        c.loop_start()
        assert self.ready.wait(10), "ledger did not connect"
        if subscribe:
            self.ready.clear()
            c.subscribe(f"{PREFIX}/+/results/+", options=SubscribeOptions(qos=1))
            assert self.ready.wait(10), "ledger did not subscribe"
        return c

    def leave(self, c: paho.Client) -> None:
        c.disconnect()
        c.loop_stop()

    def collect(self, quiet_s: float = 1.0, limit_s: float = 30.0) -> None:
        """Come back with the session and take what the broker kept, until it goes quiet."""
        with self._lock:
            self.last_at = time.monotonic()
        c = self.connect(subscribe=False)
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            with self._lock:
                quiet = time.monotonic() - self.last_at
            if quiet >= quiet_s:
                break
            time.sleep(0.05)
        self.leave(c)


class Fleet:
    """One publisher for the whole fleet's results, paced at ``rate``, timing each PUBACK."""

    def __init__(self, port: int, rate: int) -> None:
        self.rate = rate
        self.sent: dict[int, tuple[float, tuple[str, str, int]]] = {}
        self.early: dict[int, float] = {}
        self.acked: list[tuple[str, str, int]] = []
        self.latency_ms: list[float] = []
        self._lock = threading.Lock()
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-fleet",
                             protocol=MQTTProtocolVersion.MQTTv5)
        self.c.max_inflight_messages_set(100)
        self.c.on_publish = self._on_publish
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()

    def _on_publish(self, _c: Any, _u: Any, mid: int, rc: Any, _p: Any) -> None:
        now = time.perf_counter()
        if getattr(rc, "is_failure", False):
            return
        with self._lock:
            item = self.sent.pop(mid, None)
            if item is None:  # acknowledged before ``run`` recorded it
                self.early[mid] = now
                return
            self._ack(item, now)

    def _ack(self, item: tuple[float, tuple[str, str, int]], now: float) -> None:
        self.latency_ms.append((now - item[0]) * 1000.0)
        self.acked.append(item[1])

    def acked_set(self) -> set[tuple[str, str, int]]:
        with self._lock:
            return set(self.acked)

    def run(self, seconds: float) -> None:
        """Publish at ``rate`` for ``seconds`` (seq per node and camera from 0)."""
        streams = [(n, c) for n in NODES for c in CAMERAS]
        seqs = dict.fromkeys(streams, 0)
        t0 = time.perf_counter()
        i = 0
        while True:
            due = t0 + i / self.rate
            now = time.perf_counter()
            if due - t0 >= seconds:
                return
            if due > now:
                time.sleep(due - now)
            node, cam = streams[i % len(streams)]
            seq = seqs[(node, cam)]
            seqs[(node, cam)] = seq + 1
            t = time.perf_counter()
            # never under our lock: paho calls on_publish holding its own, which would deadlock
            info = self.c.publish(f"{PREFIX}/{node}/results/{cam}", payload(seq, node, cam),
                                  qos=1)
            with self._lock:
                early = self.early.pop(info.mid, None)
                if early is not None:
                    self._ack((t, (node, cam, seq)), early)
                else:
                    self.sent[info.mid] = (t, (node, cam, seq))
            i += 1

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 2) if xs else 0.0


class Live:
    """A subscriber that stays online (clean session), only counting what it receives."""

    def __init__(self, port: int) -> None:
        self.n = 0
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-live",
                             protocol=MQTTProtocolVersion.MQTTv5)
        subscribed = threading.Event()
        self.c.on_message = self._on_message
        self.c.on_subscribe = lambda *_a: subscribed.set()
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        self.c.subscribe(f"{PREFIX}/+/results/+", options=SubscribeOptions(qos=1))
        assert subscribed.wait(10), "live subscriber did not subscribe"

    def _on_message(self, _c: Any, _u: Any, _msg: paho.MQTTMessage) -> None:
        self.n += 1

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def run_setting(name: str, lines: list[str], rate: int, away: float,
                online: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"bench-broker-{name}-") as tmp:
        work = Path(tmp)
        broker = Mosquitto(work, lines)
        broker.start()
        ledger = Ledger(broker.port)
        ledger.leave(ledger.connect(subscribe=True))  # the subscriber goes away
        if "persistence true" in lines:
            # the session exists on disk before the outage, as on a broker that ran for long
            assert broker.proc is not None
            broker.proc.send_signal(signal.SIGUSR1)
            wait = time.monotonic() + 5
            while broker.saves() < 1 and time.monotonic() < wait:
                time.sleep(0.01)
        live = Live(broker.port) if online else None
        saves0, io0 = broker.saves(), broker.io()
        fleet = Fleet(broker.port, rate)
        t0 = time.monotonic()
        fleet.run(away)
        io1 = broker.io()
        took = time.monotonic() - t0
        saves = broker.saves() - saves0
        broker.kill()  # while results flow: what was acknowledged but not yet saved is lost
        acked = fleet.acked_set()
        fleet.close()
        if live is not None:
            live.close()
        db = work / "mosquitto.db"
        db_bytes = db.stat().st_size if db.exists() else 0
        broker.start()
        ledger.collect()
        broker.stop()
    lost = acked - ledger.got
    written = io1["wchar"] - io0["wchar"]
    per_msg = db_bytes / max(1, len(acked) - len(lost)) if db_bytes else 0.0
    saves_s = saves / took
    return {
        "setting": lines,
        "online_subscriber": online,
        "published_acked": len(acked),
        "received_after_restart": len(ledger.got & acked),
        "lost": len(lost),
        "lost_s": round(len(lost) / rate, 2),
        "saves": saves,
        "saves_per_s": round(saves_s, 2),
        "write_kib_s": round(written / took / 1024, 1),
        "disk_write_bytes_kib_s": round((io1["write_bytes"] - io0["write_bytes"]) / took / 1024,
                                        1),
        "db_bytes_at_kill": db_bytes,
        "db_bytes_per_queued_result": round(per_msg, 1),
        "projected_write_mib_s_full_queue": round(saves_s * per_msg * K3S_MAX_QUEUED / 2**20, 1),
        "publish_ms": {"p50": pct(fleet.latency_ms, 0.5), "p99": pct(fleet.latency_ms, 0.99),
                       "max": round(max(fleet.latency_ms, default=0.0), 2)},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one short outage per setting (<60 s)")
    ap.add_argument("--rate", type=int, default=400,
                    help="fleet results per second (default 400: 10 nodes x 2 cameras x 20 fps)")
    ap.add_argument("--away", type=float, default=None,
                    help="seconds the subscriber is away before the kill "
                         "(default 7 with --quick, else 20)")
    args = ap.parse_args()
    away = args.away if args.away is not None else (7.0 if args.quick else 20.0)
    rounds = 1 if args.quick else 3
    out: dict[str, Any] = {"rate": args.rate, "away_s": away, "rounds": rounds,
                           "mosquitto": subprocess.run([MOSQUITTO, "-h"], check=False,
                                                       capture_output=True,
                                                       text=True).stdout.splitlines()[0],
                           "loadavg_before": [round(x, 2) for x in os.getloadavg()],
                           "settings": {}}
    for r in range(rounds):
        for name, (lines, online) in settings(args.rate).items():
            res = run_setting(name, lines, args.rate, away, online)
            out["settings"].setdefault(name, []).append(res)
            print(f"round {r} {name}: lost {res['lost']} ({res['lost_s']} s), "
                  f"{res['saves_per_s']} saves/s, {res['write_kib_s']} KiB/s written, "
                  f"publish p99 {res['publish_ms']['p99']} ms", flush=True)
    summary: dict[str, dict[str, float]] = {}
    base_p99 = statistics.median(x["publish_ms"]["p99"] for x in out["settings"]["none"])
    for name, runs in out["settings"].items():
        p99 = statistics.median(x["publish_ms"]["p99"] for x in runs)
        summary[name] = {
            "lost_s": max(x["lost_s"] for x in runs),
            "write_kib_s": statistics.median(x["write_kib_s"] for x in runs),
            "saves_per_s": statistics.median(x["saves_per_s"] for x in runs),
            "full_queue_write_mib_s": statistics.median(
                x["projected_write_mib_s_full_queue"] for x in runs),
            "p99_ms": p99,
            "p99_over_none": round(p99 / base_p99, 2) if base_p99 else 0.0,
        }
    out["summary"] = summary
    out["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    (ROOT / "bench" / "out").mkdir(exist_ok=True)
    (ROOT / "bench" / "out" / "broker.json").write_text(json.dumps(out, indent=2) + "\n")
    for name, s in summary.items():
        print(f"{name}: {s}")
    print(" ".join(f"{n}_lost_s={s['lost_s']} {n}_write_kib_s={s['write_kib_s']} "
                   f"{n}_p99_over_none={s['p99_over_none']}" for n, s in summary.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
