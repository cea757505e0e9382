"""``edge-hub nodes``: the fleet as the hub sees it.

One line per camera node: online or not, the model versions its labels assign, what the agent
reports running (with loading/failed states), desired vs applied generation, the health of
each assigned version over the telemetry window (p99 latency, error rate, fps), and its cameras
(``(down)`` when one delivers no frames, ``:N trk`` the tracks open on one that tracks). With
``--versions``, a second table: per model version over the listed nodes, the merged figures
(latency percentiles of all their frames, detections per frame, median score, top classes); a
``~`` marks a percentile that is a mean of per-window percentiles (agents without sketches).
``--watch`` refreshes the same table (in place on a terminal) until Ctrl-C. A selector that
matches nothing says so on stderr (exit 0) instead of printing an empty header.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any
from urllib.parse import quote

import orjson
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from hub.client import http
from hub.client.http import HubClient, client_from_args
from hub.client.output import note, print_json, print_table
from hub.cluster.selectors import parse_selector
from hub.errors import InvalidRequest


def register(sub: Any) -> None:
    """Add ``nodes``."""
    p = http.add_client_verb(sub, "nodes", _nodes,
                             help="list camera nodes: labels, online, versions, health")
    p.add_argument("--selector", default="", help="only nodes matching this label selector")
    p.add_argument("--labels", action="store_true", help="show every label of each node")
    p.add_argument("--watch", action="store_true",
                   help="refresh the table every --interval seconds until Ctrl-C")
    p.add_argument("--interval", type=float, default=2.0, metavar="S",
                   help="seconds between refreshes of --watch (default 2)")
    p.add_argument("--versions", action="store_true",
                   help="also show each model version's figures merged over the listed nodes: "
                        "p50/p95/p99 of all their frames, detections per frame, median score, "
                        "top classes")


def _running(node: dict[str, Any]) -> str:
    parts = []
    for name, m in sorted(node.get("models", {}).items()):
        text = f"{name}={m.get('version') or '-'}"
        if m.get("status") != "active":
            text += f" ({m.get('status')}" + (f" {m['target_version']}" if m.get(
                "target_version") else "") + ")"
        parts.append(text)
    return " ".join(parts) or "-"


def _health(node: dict[str, Any]) -> tuple[str, str, str]:
    p99, err, fps = [], [], []
    for model, version in sorted(node["assigned"].items()):
        m = node["metrics"].get(f"{model}@{version}")
        if not m:
            continue
        p99.append(_ms(m, "p99_ms"))
        err.append("-" if m.get("error_rate") is None else f"{m['error_rate'] * 100:.2f}")
        fps.append(f"{m['fps']:.1f}")
    return " ".join(p99) or "-", " ".join(err) or "-", " ".join(fps) or "-"


def _cameras(node: dict[str, Any]) -> str:
    """Each camera: its name, ``(down)`` when it delivers no frames, and ``:N trk`` with the
    tracks open now where it tracks objects."""
    parts = []
    for c in node.get("cameras", []):
        text = c["camera"] + ("" if c.get("connected") else "(down)")
        if c.get("active_tracks") is not None:
            text += f":{c['active_tracks']}trk"
        parts.append(text)
    return " ".join(parts) or "-"


def _ms(m: dict[str, Any], key: str) -> str:
    value = m.get(key)
    if value is None:
        return "-"
    return f"{value:.1f}" + ("" if m.get("exact") else "~")


def version_rows(versions: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for v in versions:
        dpf, score = v.get("detections_per_frame"), v.get("score_p50")
        classes = v.get("classes") or {}
        total = sum(classes.values())
        top = " ".join(f"{k}:{c / total:.0%}" for k, c in list(classes.items())[:3]) if total \
            else "-"
        rows.append([f"{v['model']}@{v['version']}", str(v["nodes"]), _ms(v, "p50_ms"),
                     _ms(v, "p95_ms"), _ms(v, "p99_ms"),
                     "-" if v.get("error_rate") is None else f"{v['error_rate'] * 100:.2f}",
                     "-" if dpf is None else f"{dpf:.2f}",
                     "-" if score is None else f"{score:.3f}", top])
    return rows


async def _nodes(args: argparse.Namespace) -> int:
    """The camera nodes the hub sees, with their assigned and running model versions and
    health over the telemetry window (--watch: refreshed every --interval seconds until
    Ctrl-C)."""
    parse_selector(args.selector)  # a bad selector exits 2 before any request
    if not args.interval > 0:
        raise InvalidRequest(f"--interval must be a positive number of seconds, got "
                             f"{args.interval:g}")
    path = "/v1/nodes?selector=" + quote(args.selector, safe="")
    async with client_from_args(args) as hub:
        _, out = await hub.request_json("GET", path)
        if args.watch and not args.json:
            await _watch(hub, path, out, args)
            return 0
    if args.json:
        print_json(out)
        return 0
    if not out["nodes"]:
        note(f"no nodes match selector '{args.selector}'" if args.selector
             else "the hub sees no camera nodes")
        return 0
    _console().print(_node_table(out, args.labels))
    if args.versions:
        print_table(["VERSION", "NODES", "P50 MS", "P95 MS", "P99 MS", "ERR %", "DET/FRAME",
                     "SCORE P50", "TOP CLASSES"], version_rows(out.get("versions", [])),
                    title="merged over the listed nodes and the telemetry window")
    return 0


def _console() -> Console:
    tty = sys.stdout.isatty()
    return Console(width=None if tty else 200, no_color=not tty, highlight=False)


def _node_table(out: dict[str, Any], labels: bool) -> Table:
    """One row per node (``GET /v1/nodes``)."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    cols = ["NODE", "ONLINE", "ASSIGNED", "RUNNING", "GEN", "P99 MS", "ERR %", "FPS", "CAMERAS"]
    if labels:
        cols.append("LABELS")
    for c in cols:
        table.add_column(c, overflow="fold")
    for n in out["nodes"]:
        gen = n["generation"]
        p99, err, fps = _health(n)
        row = [n["name"], "yes" if n["online"] else "no",
               " ".join(f"{k}={v}" for k, v in sorted(n["assigned"].items())) or "-",
               _running(n), f"{gen['applied']}/{gen['desired']}", p99, err, fps,
               _cameras(n)]
        if labels:
            row.append(",".join(f"{k}={v}" for k, v in sorted(n["labels"].items())))
        table.add_row(*row)
    return table


def _watch_view(out: dict[str, Any], args: argparse.Namespace) -> RenderableType:
    """The watched screen: a time line, the nodes (or why there are none), the versions."""
    head = Text(f"{time.strftime('%H:%M:%S')}  {len(out['nodes'])} nodes"
                + (f" matching '{args.selector}'" if args.selector else ""), style="bold")
    if not out["nodes"]:
        return Group(head, Text(f"no nodes match selector '{args.selector}'" if args.selector
                                else "the hub sees no camera nodes"))
    parts: list[RenderableType] = [head, _node_table(out, args.labels)]
    if args.versions:
        versions = Table(box=None, header_style="bold", pad_edge=False)
        for c in ("VERSION", "NODES", "P50 MS", "P95 MS", "P99 MS", "ERR %", "DET/FRAME",
                  "SCORE P50", "TOP CLASSES"):
            versions.add_column(c)
        for row in version_rows(out.get("versions", [])):
            versions.add_row(*row)
        parts.append(versions)
    return Group(*parts)


async def _watch(hub: HubClient, path: str, out: dict[str, Any],
                 args: argparse.Namespace) -> None:
    """Refresh until Ctrl-C: in place on a terminal, else the screen again whenever it
    changed."""
    console = _console()
    if sys.stdout.isatty():
        with Live(_watch_view(out, args), console=console, auto_refresh=False) as live:
            while True:
                await asyncio.sleep(args.interval)
                _, out = await hub.request_json("GET", path)
                live.update(_watch_view(out, args), refresh=True)
    last = None
    while True:
        key = orjson.dumps(out["nodes"], option=orjson.OPT_SORT_KEYS)
        if key != last:
            console.print(_watch_view(out, args))
            last = key
        await asyncio.sleep(args.interval)
        _, out = await hub.request_json("GET", path)
