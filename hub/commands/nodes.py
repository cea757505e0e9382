"""``edge-hub nodes``: the fleet as the hub sees it.

One line per camera node: online or not, the model versions its labels assign, what the agent
reports running (with loading/failed states), desired vs applied generation, and the health of
each assigned version over the telemetry window (p99 latency, error rate, fps).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any
from urllib.parse import quote

from rich.console import Console
from rich.table import Table

from hub.client import http
from hub.client.http import client_from_args
from hub.client.output import print_json
from hub.cluster.selectors import parse_selector
from hub.commands.rollout import RolloutRefusedError
from hub.errors import InvalidRequest, NotFound


def register(sub: Any) -> None:
    """Add ``nodes``."""
    p = http.add_client_verb(sub, "nodes", _nodes,
                             help="list camera nodes: labels, online, versions, health")
    p.add_argument("--selector", default="", help="only nodes matching this label selector")
    p.add_argument("--labels", action="store_true", help="show every label of each node")


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
        p99.append("-" if m.get("p99_ms") is None else f"{m['p99_ms']:.1f}")
        err.append("-" if m.get("error_rate") is None else f"{m['error_rate'] * 100:.2f}")
        fps.append(f"{m['fps']:.1f}")
    return " ".join(p99) or "-", " ".join(err) or "-", " ".join(fps) or "-"


async def _nodes(args: argparse.Namespace) -> int:
    """The camera nodes the hub sees, with their assigned and running model versions and
    health over the telemetry window."""
    parse_selector(args.selector)  # a bad selector exits 2 before any request
    async with client_from_args(args) as hub:
        try:
            _, out = await hub.request_json(
                "GET", "/v1/nodes?selector=" + quote(args.selector, safe=""))
        except (InvalidRequest, NotFound) as exc:
            raise RolloutRefusedError(str(exc)) from exc
    if args.json:
        print_json(out)
        return 0
    tty = sys.stdout.isatty()
    table = Table(box=None, header_style="bold", pad_edge=False)
    cols = ["NODE", "ONLINE", "ASSIGNED", "RUNNING", "GEN", "P99 MS", "ERR %", "FPS"]
    if args.labels:
        cols.append("LABELS")
    for c in cols:
        table.add_column(c, overflow="fold")
    for n in out["nodes"]:
        gen = n["generation"]
        p99, err, fps = _health(n)
        row = [n["name"], "yes" if n["online"] else "no",
               " ".join(f"{k}={v}" for k, v in sorted(n["assigned"].items())) or "-",
               _running(n), f"{gen['applied']}/{gen['desired']}", p99, err, fps]
        if args.labels:
            row.append(",".join(f"{k}={v}" for k, v in sorted(n["labels"].items())))
        table.add_row(*row)
    Console(width=None if tty else 200, no_color=not tty, highlight=False).print(table)
    return 0
