"""``edge-hub rollout start|status|pause|resume|promote|abort|rollback``: the ops engineer's side.

``start`` checks the selector, the gates, the waves and the durations here before anything is
sent, then the hub checks the model version and the nodes; ``--dry-run`` prints which nodes would
be in which wave and changes nothing. ``status ID --watch`` follows a rollout live (a table of
waves and nodes with version, state and metrics) until it ends. Any refusal of a rollout request
(bad input, unknown model or version, a conflicting rollout, a command the rollout's state does
not allow) exits 2 with the reason; a wrong token exits 1; an unreachable hub exits 3.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import re
import sys
import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from edge_agent.common import cli
from hub.client import http
from hub.client.http import HubClient, client_from_args
from hub.client.output import print_json, say
from hub.errors import Conflict, HubError, InvalidRequest, NotFound
from hub.rollouts.model import TERMINAL_STATES, parse_spec

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_COMMANDS = ("pause", "resume", "promote", "abort", "rollback")


class RolloutRefusedError(HubError, code="refused", exit_code=2):
    """The hub refused a rollout request (its message says why)."""


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``5m``, ``1h30m``, ``500ms`` -> seconds; InvalidRequest otherwise."""
    t = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        return float(t)
    pos, total = 0, 0.0
    for m in _DURATION_RE.finditer(t):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(t) or not t:
        raise InvalidRequest(f"invalid duration {text!r}: use e.g. 300, 90s, 5m, 1h30m")
    return total


def _waves(text: str) -> list[float]:
    try:
        return [float(p.strip().rstrip("%")) for p in text.split(",") if p.strip()]
    except ValueError as exc:
        raise InvalidRequest(f"invalid --waves {text!r}: comma-separated percentages") from exc


def build_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The request body from the arguments, validated locally (same rules as the hub)."""
    body: dict[str, Any] = {"model": args.model, "version": args.version,
                            "selector": args.selector, "waves": _waves(args.waves),
                            "bake_s": parse_duration(args.bake), "gates": args.gate,
                            "deadline_s": parse_duration(args.deadline),
                            "offline_wait_s": parse_duration(args.offline_wait),
                            "min_samples": args.min_samples}
    canary = args.canary.strip()
    if canary.endswith("%"):
        try:
            body["canary_percent"] = float(canary[:-1])
        except ValueError as exc:
            raise InvalidRequest(f"invalid --canary {args.canary!r}") from exc
    elif canary.isdigit():
        body["canary"] = int(canary)
    else:
        raise InvalidRequest(f"invalid --canary {args.canary!r}: a node count or a percentage")
    parse_spec(dict(body))  # selector, gates, waves, names: refused here, before any request
    return body


def register(sub: Any) -> None:
    """Add ``rollout`` and its actions."""
    acts = cli.add_group(
        sub, "rollout", help="roll a model version out to camera nodes (canary, waves, gates)",
        description="Start and steer rollouts. " + http.CONNECTION_NOTE,
    )
    st = http.add_client_verb(acts, "start", _start,
                              help="start a rollout (or --dry-run to see its plan)")
    st.add_argument("model", metavar="MODEL")
    st.add_argument("version", metavar="VERSION")
    st.add_argument("--selector", default="", help="label selector, e.g. 'site=a,line in (1,2)'")
    st.add_argument("--canary", default="1", help="canary nodes: a count or N%% (default 1)")
    st.add_argument("--waves", default="25,50,100",
                    help="cumulative percentages after the canary (default 25,50,100)")
    st.add_argument("--bake", default="5m", help="time each wave runs before it is judged")
    st.add_argument("--gate", action="append", default=[], metavar="GATE",
                    help="e.g. 'p99_ms<=80', 'p99_ms<=1.5x', 'error_rate<=0.01', 'fps>=0.9x' "
                         "(repeatable; Kx = K times the baseline nodes)")
    st.add_argument("--deadline", default="10m", help="time a node has to report active")
    st.add_argument("--offline-wait", default="1h",
                    help="after the last wave, how long to wait for offline nodes")
    st.add_argument("--min-samples", type=int, default=2,
                    help="telemetry messages per node before its gates count (default 2)")
    st.add_argument("--dry-run", action="store_true", help="print the plan; change nothing")

    stat = http.add_client_verb(acts, "status", _status,
                                help="show rollouts, or one rollout (--watch: live)")
    stat.add_argument("id", nargs="?", type=int, metavar="ID")
    stat.add_argument("--watch", action="store_true", help="follow until the rollout ends")
    stat.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")

    for verb, text in (("pause", "stop moving forward (resume continues)"),
                       ("resume", "continue a paused rollout (the bake restarts)"),
                       ("promote", "end the current bake now and go to the next wave"),
                       ("abort", "stop here; nodes keep the version they have"),
                       ("rollback", "return every touched node to its previous version")):
        c = http.add_client_verb(acts, verb, functools.partial(_command, verb=verb), help=text,
                                 description=text[0].upper() + text[1:] + ".")
        c.add_argument("id", type=int, metavar="ID")


async def _request(hub: HubClient, method: str, path: str, **kw: Any) -> Any:
    try:
        _, body = await hub.request_json(method, path, **kw)
    except (InvalidRequest, NotFound, Conflict) as exc:
        raise RolloutRefusedError(str(exc)) from exc
    return body


async def _start(args: argparse.Namespace) -> int:
    """Roll MODEL VERSION out to the camera nodes matching --selector: first --canary nodes,
    then cumulative --waves percentages, each baked for --bake and judged by every --gate;
    rolled back automatically when a gate fails, a node reports failed, or a node is not active
    within --deadline."""
    body = build_spec(args)
    body["dry_run"] = bool(args.dry_run)
    async with client_from_args(args) as hub:
        out = await _request(hub, "POST", "/v1/rollouts", json=body)
    if args.json:
        print_json(out)
        return 0
    if args.dry_run:
        plan = out["plan"]
        table = Table(title=f"plan: {plan['model']} -> {plan['version']} (dry run, nothing "
                      "changed)", box=None, header_style="bold")
        for col in ("WAVE", "NODE", "CURRENT", "ONLINE"):
            table.add_column(col)
        for i, wave in enumerate(plan["waves"]):
            for n in wave:
                table.add_row(_wave_name(i), n["node"], n["current_version"] or "-",
                              "yes" if n["online"] else "no")
        _console().print(table)
        return 0
    r = out["rollout"]
    say(f"rollout {r['id']} started: {r['model']} {r['version']} to {r['nodes_total']} nodes "
        f"in {r['waves']} waves")
    return 0


def _wave_name(i: int) -> str:
    return "canary" if i == 0 else f"wave {i}"


def _console() -> Console:
    tty = sys.stdout.isatty()
    return Console(width=None if tty else 200, no_color=not tty, highlight=False)


def _fmt(v: Any, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def render(r: dict[str, Any]) -> Group:
    """The live view of one rollout: a header and a table of nodes by wave."""
    head = Text()
    head.append(f"rollout {r['id']}  ", style="bold")
    head.append(f"{r['model']} -> {r['version']}  selector '{r['selector']}'  ")
    head.append(f"{r['state']}", style="bold")
    head.append(f"  wave {min(r['wave'] + 1, r['waves'])}/{r['waves']}")
    if r.get("message"):
        head.append(f"  ({r['message']})")
    if r.get("cause"):
        c = r["cause"]
        head.append("\ncause: " + ", ".join(f"{k}={v}" for k, v in c.items()), style="red")
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("WAVE", "NODE", "STATUS", "RUNNING", "ONLINE", "P99 MS", "ERR %", "FPS", "NOTE"):
        table.add_column(col)
    for n in r["nodes"]:
        live = n.get("live") or {}
        m = live.get("metrics") or {}
        err = m.get("error_rate")
        running = live.get("running") or "-"
        if live.get("status") and live["status"] != "active":
            running += f" ({live['status']})"
        table.add_row(_wave_name(n["wave"]), n["node"], n["status"], running,
                      "yes" if live.get("online") else "no", _fmt(m.get("p99_ms")),
                      _fmt(err * 100 if err is not None else None, 2), _fmt(m.get("fps")),
                      n.get("error") or "")
    return Group(head, table)


async def _status(args: argparse.Namespace) -> int:
    """Without ID: the latest rollouts. With ID: its waves and nodes with version, state and
    metrics."""
    async with client_from_args(args) as hub:
        if args.id is None:
            out = await _request(hub, "GET", "/v1/rollouts")
            if args.json:
                print_json(out)
                return 0
            table = Table(box=None, header_style="bold", pad_edge=False)
            for col in ("ID", "MODEL", "VERSION", "SELECTOR", "STATE", "WAVE", "NODES",
                        "CAUSE"):
                table.add_column(col)
            for r in out["rollouts"]:
                cause = (r.get("cause") or {}).get("reason", "")
                table.add_row(str(r["id"]), r["model"], r["version"], r["selector"],
                              r["state"], f"{min(r['wave'] + 1, r['waves'])}/{r['waves']}",
                              str(r["nodes_total"]), cause)
            _console().print(table)
            return 0
        path = f"/v1/rollouts/{args.id}"
        r = (await _request(hub, "GET", path))["rollout"]
        if args.json and not args.watch:
            print_json(r)
            return 0
        if not args.watch:
            _console().print(render(r))
            return 0
        r = await _watch(hub, path, r, args)
    return 0 if r["state"] != "rolled_back" else 4


async def _watch(hub: HubClient, path: str, r: dict[str, Any],
                 args: argparse.Namespace) -> dict[str, Any]:
    """Follow a rollout until it ends: a live table on a terminal, else one line per change."""
    if sys.stdout.isatty():
        with Live(render(r), console=_console(), refresh_per_second=4) as live:
            while r["state"] not in TERMINAL_STATES:
                await asyncio.sleep(args.interval)
                r = (await _request(hub, "GET", path))["rollout"]
                live.update(render(r))
        return r
    last = None
    while True:
        key = (r["state"], r["wave"], tuple(sorted(r["node_counts"].items())))
        if key != last:
            say(f"{time.strftime('%H:%M:%S')} rollout {r['id']} {r['state']} wave "
                f"{min(r['wave'] + 1, r['waves'])}/{r['waves']} "
                + " ".join(f"{k}={v}" for k, v in sorted(r["node_counts"].items())))
            last = key
        if r["state"] in TERMINAL_STATES:
            break
        await asyncio.sleep(args.interval)
        r = (await _request(hub, "GET", path))["rollout"]
    if args.json:
        print_json(r)
    else:
        _console().print(render(r))
    return r


async def _command(args: argparse.Namespace, verb: str) -> int:
    async with client_from_args(args) as hub:
        out = await _request(hub, "POST", f"/v1/rollouts/{args.id}/{verb}")
    r = out["rollout"]
    if args.json:
        print_json(r)
    else:
        say(f"rollout {r['id']}: {r['state']}" + (f" ({r['message']})" if r["message"] else ""))
    return 0
