"""The fleet page's cost: page weight, and the hub's CPU with N open pages on a large fleet.

A hub (``hub.server.app.build_app``, plain HTTP on loopback, a static inventory of
``--nodes`` camera nodes, no broker) runs in a child process, which also feeds its real
``Fleet`` a state and a telemetry message per node every ``--telemetry-s`` (what MQTT would
bring; the MQTT client itself is not measured). The parent then:

1. loads the page as a browser would (``/``, every ``/ui/*`` file it references, and the icon)
   and sums the bytes: the page weight, before any data;
2. measures the child's CPU (utime + stime from /proc) over ``--window-s`` with no page open:
   the baseline;
3. opens ``--pages`` pages that behave like ``app.js``: each reads ``/v1/stream``, fetches
   ``/v1/nodes`` when the fleet digest changes (at most every 2 s) and every 30 s, and
   ``/v1/rollouts`` once; and measures the child's CPU over the same window.

Prints the ratio (pages / baseline CPU) and ends with one ``name=value`` line; JSON goes to
``bench/out/dashboard.json``. ``--quick``: 5,000 nodes, 20 pages, 8 s windows (< 60 s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import re
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_agent.contract.protocol import (  # noqa: E402
    LatencySummary,
    ModelState,
    ModelTelemetry,
    StateMessage,
    TelemetryMessage,
)
from hub.cluster.base import write_inventory  # noqa: E402
from hub.config import HubSettings  # noqa: E402
from hub.server import app as server_app  # noqa: E402
from hub.web import stream  # noqa: E402

TOKEN = "bench-token-0123456789"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _hub_child(data_dir: str, port: int, nodes: int, telemetry_s: float,
               ready: Any) -> None:
    """The hub under test, with its fleet fed in-process (runs in the child)."""
    inv = Path(data_dir) / "inventory.yaml"
    names = [f"cam-{i:05d}" for i in range(nodes)]
    write_inventory(inv, {n: {"edge.ai/camera-node": "true", "site": f"s{i % 50}",
                              "edge.ai/model.det": "1.0"} for i, n in enumerate(names)})
    settings = HubSettings(
        storage={"data_dir": Path(data_dir) / "data"},
        api={"token": TOKEN, "host": "127.0.0.1", "port": port, "plain_http": True,
             "max_connections": 256},
        mqtt={"port": 1}, cluster={"backend": "static", "inventory_file": inv},
        telemetry={"window_s": 60, "offline_after_s": 30})

    async def main() -> None:
        app = server_app.build_app(settings)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await server_app.listen(runner, "127.0.0.1", port, None)
        fleet = app[stream.WATCHER_KEY].control.fleet  # type: ignore[attr-defined]
        for n in names:
            fleet.on_state(n, StateMessage(node=n, online=True, ts=time.time(), generation=1,
                                           agent_version="sim", providers=["CPU"],
                                           models=[ModelState(name="det", version="1.0",
                                                              status="active")]))
        ready.set()
        while True:
            t0 = time.time()
            for i, n in enumerate(names):
                lat = 20.0 + i % 7
                fleet.on_telemetry(n, TelemetryMessage(
                    node=n, ts=time.time(), interval_s=telemetry_s, agent_version="sim",
                    models=[ModelTelemetry(name="det", version="1.0", frames=100, errors=0,
                                           latency_ms=LatencySummary(p50=lat * 0.8,
                                                                     p95=lat * 0.95, p99=lat))]))
            await asyncio.sleep(max(0.0, telemetry_s - (time.time() - t0)))

    asyncio.run(main())


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def page_weight(http: aiohttp.ClientSession, url: str) -> dict[str, int]:
    """Bytes of everything the page loads before data: HTML, its modules (followed through
    their imports), the style sheet and the icon."""
    sizes: dict[str, int] = {}
    todo = ["/"]
    while todo:
        path = todo.pop()
        if path in sizes:
            continue
        async with http.get(url + path) as r:
            body = await r.read()
            assert r.status == 200, (path, r.status)
        sizes[path] = len(body)
        text = body.decode()
        todo += re.findall(r'(?:src|href)="(/ui/[^"]+)"', text)
        todo += ["/ui/" + m for m in re.findall(r'from "\./([^"]+)"', text)]
    return sizes


async def fake_page(http: aiohttp.ClientSession, url: str, stop: asyncio.Event,
                    counts: dict[str, int]) -> None:
    """What app.js asks of the hub, without the DOM."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    digest, nodes_at = None, 0.0

    async def nodes() -> None:
        nonlocal nodes_at
        nodes_at = time.monotonic()
        async with http.get(url + "/v1/nodes", headers=headers) as r:
            counts["nodes_bytes"] += len(await r.read())
            counts["nodes_fetches"] += 1

    async with http.get(url + "/v1/rollouts", headers=headers) as r:
        await r.read()
    async with http.get(url + "/v1/stream", headers=headers,
                        timeout=aiohttp.ClientTimeout(total=None, sock_read=60)) as r:
        assert r.status == 200, r.status
        while not stop.is_set():
            line = await r.content.readline()
            if not line:
                return
            msg = json.loads(line)
            counts["lines"] += 1
            due = time.monotonic() - nodes_at > 30
            if msg["type"] == "snapshot" and (msg["fleet"]["digest"] != digest or due):
                digest = msg["fleet"]["digest"]
                if time.monotonic() - nodes_at >= 2:
                    await nodes()


async def measure(url: str, pid: int, pages: int, window_s: float) -> dict[str, Any]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        weight = await page_weight(http, url)
        c0 = _cpu_s(pid)
        await asyncio.sleep(window_s)
        baseline = (_cpu_s(pid) - c0) / window_s
        stop = asyncio.Event()
        counts = {"lines": 0, "nodes_fetches": 0, "nodes_bytes": 0}
        tasks = [asyncio.create_task(fake_page(http, url, stop, counts)) for _ in range(pages)]
        await asyncio.sleep(3)  # the pages' first /v1/nodes fetches: a page opening
        c1 = _cpu_s(pid)
        await asyncio.sleep(window_s)
        with_pages = (_cpu_s(pid) - c1) / window_s
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"page_weight_bytes": sum(weight.values()), "page_files": weight,
            "cpu_baseline": baseline, "cpu_with_pages": with_pages, **counts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="5,000 nodes, 20 pages, 8 s windows")
    ap.add_argument("--nodes", type=int, default=5000, help="camera nodes (default 5000)")
    ap.add_argument("--pages", type=int, default=20, help="open pages (default 20)")
    ap.add_argument("--window-s", type=float, default=30.0,
                    help="CPU measurement window, seconds (default 30; 8 with --quick)")
    ap.add_argument("--telemetry-s", type=float, default=5.0,
                    help="seconds between two telemetry messages of a node (default 5)")
    args = ap.parse_args()
    if args.quick:
        args.window_s = 8.0
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        ready = mp.get_context("spawn").Event()
        child = mp.get_context("spawn").Process(
            target=_hub_child, args=(tmp, port, args.nodes, args.telemetry_s, ready))
        child.start()
        try:
            if not ready.wait(120):
                raise SystemExit("the hub did not start")
            assert child.pid is not None
            out = asyncio.run(measure(f"http://127.0.0.1:{port}", child.pid, args.pages,
                                      args.window_s))
        finally:
            child.terminate()
            child.join(10)
    out |= {"nodes": args.nodes, "pages": args.pages, "window_s": args.window_s}
    ratio = out["cpu_with_pages"] / max(out["cpu_baseline"], 1e-3)
    out["ratio"] = ratio
    Path(ROOT / "bench" / "out").mkdir(exist_ok=True)
    (ROOT / "bench" / "out" / "dashboard.json").write_text(json.dumps(out, indent=2))
    print(f"page weight: {out['page_weight_bytes']} bytes in {len(out['page_files'])} files")
    print(f"hub CPU, {args.nodes} nodes: {out['cpu_baseline']:.1%} of a core with no page, "
          f"{out['cpu_with_pages']:.1%} with {args.pages} pages streaming "
          f"({ratio:.2f}x the baseline); {out['nodes_fetches']} node-list fetches, "
          f"{out['nodes_bytes'] / 1e6:.1f} MB")
    print(f"page_weight_bytes={out['page_weight_bytes']} nodes={args.nodes} pages={args.pages} "
          f"cpu_baseline={out['cpu_baseline']:.3f} cpu_with_pages={out['cpu_with_pages']:.3f} "
          f"ratio={ratio:.2f}")


if __name__ == "__main__":
    main()
