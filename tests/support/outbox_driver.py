"""A stand-in agent process for fault tests: the real Outbox, MqttLink and Drain, nothing else.

Run as ``python -m tests.support.outbox_driver --db PATH --mqtt JSON --prefix P --node NODE``
(``--mqtt``: the ``mqtt`` settings section, ``mqtt_args`` builds it from a test broker). It
publishes results for ``--cameras`` cameras in small batches forever and, on stdout, one JSON
line per event the test checks against (each with the process's ``pid``):

- ``{"ready": true}`` once the outbox is open and the link started;
- ``{"issued": [[camera, x], ...]}`` right after ``publish`` took those results;
- ``{"committed": [[camera, x], ...]}`` after ``flush`` said they are on disk;
- ``{"exit": code}`` when a driver that was not killed ends (its outbox closed).

Every payload carries ``"x": "<pid>-<n>"``, unique per result, so a subscriber can tell a
redelivery (same bytes) from a reused seq (same seq, other bytes), and a test can find a
committed result whatever seq the commit gave it. SIGTERM stops it as the agent stops: the
drain (waiting for the PUBACKs of what is in flight), then the link, then the outbox.

``python -m tests.support.outbox_driver zygote`` imports everything once and then forks one driver
per line of JSON argv it reads on stdin: a test that kills and restarts the agent 20 times pays the
interpreter start and imports once, not 20 times. The zygote starts no thread before forking.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import traceback
from pathlib import Path

import orjson
import structlog

from edge_agent.config import MqttSettings, OutboxSettings
from edge_agent.contract.protocol import StateMessage
from edge_agent.outbox.facade import Outbox
from edge_agent.transport.drain import Drain
from edge_agent.transport.link import MqttLink


def mqtt_args(settings: dict[str, object]) -> list[str]:
    """``--mqtt JSON`` for ``settings`` (``Broker.settings(node)``), paths as strings."""
    return ["--mqtt", orjson.dumps(settings, default=str).decode()]


def _emit(obj: dict[str, object]) -> None:
    obj["pid"] = os.getpid()
    sys.stdout.write(orjson.dumps(obj).decode() + "\n")
    sys.stdout.flush()


def result(node: str, camera: str, marker: str) -> dict[str, object]:
    """A small but complete ResultMessage-shaped dict (without seq)."""
    return {
        "v": 1, "node": node, "camera": camera, "ts": 1.0, "x": marker,
        "model": {"name": "m", "version": "1"}, "task": "classification",
        "frame": {"width": 64, "height": 64}, "latency_ms": {"inference": 1.0},
        "classes": [{"id": 1, "label": "a", "score": 0.5}],
    }


async def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", type=Path, required=True)
    ap.add_argument("--mqtt", type=orjson.loads, required=True,
                    help="the mqtt settings section as JSON (host, port, TLS files)")
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--node", required=True)
    ap.add_argument("--cameras", type=int, default=2)
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--commit-ms", type=int, default=5)
    ap.add_argument("--max-batches", type=int, default=0, help="0 = forever")
    ap.add_argument("--fps", type=float, default=0.0,
                    help="results per second per camera, 0 = as fast as commits allow")
    args = ap.parse_args(argv)

    # logs go to stderr: stdout carries the JSON events the test parses
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    outbox = await Outbox(
        OutboxSettings(path=args.db, commit_interval_ms=args.commit_ms),
        topic_prefix=args.prefix,
    ).aopen()
    link = MqttLink(
        MqttSettings(**args.mqtt, topic_prefix=args.prefix, reconnect_min_s=0.05,
                     reconnect_max_s=0.5, keepalive_s=5),
        args.node,
    )
    await link.start()
    link.publish_state(StateMessage(node=args.node, online=True))
    drain = Drain(outbox, link)
    drain.start()
    _emit({"ready": True})
    cams = [f"cam{i}" for i in range(args.cameras)]
    n = 0
    batches = 0
    pid = os.getpid()
    period = args.batch / (args.fps * len(cams)) if args.fps > 0 else 0.0
    t_next = loop.time()
    while not stop.is_set() and (args.max_batches == 0 or batches < args.max_batches):
        if period:
            t_next += period
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, t_next - loop.time()))
            if stop.is_set():
                break
        issued = []
        for _ in range(args.batch):
            cam = cams[n % len(cams)]
            marker = f"{pid}-{n}"
            outbox.publish(result(args.node, cam, marker))
            issued.append([cam, marker])
            n += 1
        _emit({"issued": issued})
        if await outbox.aflush(10.0):
            _emit({"committed": issued})
        batches += 1
    if args.max_batches:
        await stop.wait()
    await drain.aclose(2.0)
    await link.aclose()
    await outbox.aclose()


def zygote() -> None:
    """Fork a driver per stdin line (a JSON argv list); reap children; exit at EOF."""
    for line in sys.stdin:
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
        argv = orjson.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                sys.stdin.close()
                asyncio.run(main(argv))
            except BaseException:  # the child must never return into the zygote's loop
                traceback.print_exc()
                code = 1
            finally:
                _emit({"exit": code})
                os._exit(code)


if __name__ == "__main__":
    if sys.argv[1:] == ["zygote"]:
        zygote()
    else:
        asyncio.run(main())
