"""``edge-hub rollout start|status|pause|resume|promote|abort|rollback``: the ops engineer's side.

``start`` checks the selector, the gates, the waves and the durations here before anything is
sent, then the hub checks the model version and the nodes; ``--dry-run`` prints the whole spec
and which nodes would be in which wave, and changes nothing. ``start`` refuses when none of the
selected nodes is online (the rollout would only wait) unless ``--allow-offline``. ``--shadow``
starts every wave with a shadow phase (the candidate runs beside each node's version, compared,
never serving, before the switch). ``status --watch`` follows a rollout live like Argo's
``get rollout --watch`` (state, wave n/N, bake remaining, every gate's value against its limit,
the new version against the baseline, nodes with their previous version, the last events; the
rendering is ``hub/commands/rollout_view.py``) until it ends; without an ID it follows the
active rollout, else the latest.

Exit codes, as for every hub verb: 0 done; 1 refused by the hub (not found, conflict, wrong
token) or the watched rollout ended rolled back; 2 a usage error or a request the hub finds
invalid (bad selector, gate, waves, duration, unknown model version); 3 the hub is unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import re
import sys
import time
from typing import Any

from rich.console import Console
from rich.live import Live

from edge_agent.common import cli
from hub.client import http
from hub.client.http import HubClient, client_from_args
from hub.client.output import note, print_json, say
from hub.commands import rollout_view as view
from hub.errors import Conflict, InvalidRequest, NotFound
from hub.rollouts.model import TERMINAL_STATES, RolloutSpec, ShadowSpec, parse_spec

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_COMMANDS = ("pause", "resume", "promote", "abort", "rollback")
#: The spec's defaults, shown in --help (the CLI's own defaults are the same durations).
_SPEC = RolloutSpec(model="m", version="1")
_DEFAULT_INTERVAL_S = 2.0


class NoNodeOnlineError(Conflict, code="no_node_online"):
    """None of the selected nodes is online: the rollout would only wait (exit 1)."""


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
    shadow = _shadow(args)
    if shadow is not None:
        body["shadow"] = shadow
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


def _shadow(args: argparse.Namespace) -> dict[str, Any] | None:
    """The shadow phase from --shadow and its options (any of them turns it on)."""
    given = {"gate": args.shadow_gate, "min_samples": args.shadow_samples,
             "timeout_s": parse_duration(args.shadow_timeout) if args.shadow_timeout else None}
    if not args.shadow and all(v is None for v in given.values()):
        return None
    return {k: v for k, v in given.items() if v is not None}


_SHADOW = ShadowSpec()


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
    st.add_argument("--selector", default="",
                    help="label selector, e.g. 'site=a,line in (1,2)' (default: every camera "
                         "node)")
    st.add_argument("--canary", default="1",
                    help="canary nodes: a count or N%% (default 1; 0: no canary, the first "
                         "wave is wave 1)")
    st.add_argument("--waves", default="25,50,100",
                    help="cumulative percentages after the canary (default 25,50,100)")
    st.add_argument("--bake", default="5m",
                    help="time each wave runs before it is judged (default 5m = "
                         f"{_SPEC.bake_s:g}s)")
    st.add_argument("--gate", action="append", default=[], metavar="GATE",
                    help="e.g. 'p99_ms<=80', 'p99_ms<=1.5x', 'error_rate<=0.01', 'fps>=0.9x' "
                         "(repeatable; Kx = K times the baseline nodes). Without any --gate "
                         "only a node reporting the version failed, or not active by "
                         "--deadline, rolls back: slow or wrong answers do not")
    st.add_argument("--deadline", default="10m",
                    help="time a node has to report the new version active (default 10m = "
                         f"{_SPEC.deadline_s:g}s)")
    st.add_argument("--offline-wait", default="1h",
                    help="after the last wave, how long to wait for nodes that were offline "
                         f"(default 1h = {_SPEC.offline_wait_s:g}s; 0: do not wait)")
    st.add_argument("--min-samples", type=int, default=_SPEC.min_samples,
                    help="telemetry messages per node before its gates count (default "
                         f"{_SPEC.min_samples})")
    st.add_argument("--allow-offline", action="store_true",
                    help="start even when none of the selected nodes is online (they are "
                         "upgraded as they return); without it such a start is refused")
    st.add_argument("--shadow", action="store_true",
                    help="start every wave with a shadow phase: the candidate runs beside each "
                         "node's version on a sample of the same frames, never serving; the wave "
                         "is switched only when the agreement passes --shadow-gate")
    st.add_argument("--shadow-gate", metavar="GATE",
                    help=f"the shadow phase's gate (default '{_SHADOW.gate}'; implies --shadow)")
    st.add_argument("--shadow-samples", type=int, metavar="N",
                    help="frames the wave's nodes must compare together before the gate is "
                         f"judged (default {_SHADOW.min_samples}; implies --shadow)")
    st.add_argument("--shadow-timeout", metavar="DURATION",
                    help="how long a wave's shadow phase may take before the rollout ends "
                         f"(default {_SHADOW.timeout_s:g}s; implies --shadow)")
    st.add_argument("--dry-run", action="store_true",
                    help="print the whole spec and which node is in which wave; change nothing")

    stat = http.add_client_verb(acts, "status", _status,
                                help="show rollouts, or one rollout (--watch: live)")
    stat.add_argument("id", nargs="?", type=int, metavar="ID",
                      help="the rollout (default: list the latest; with --watch, follow the "
                           "active rollout, else the latest)")
    stat.add_argument("--watch", action="store_true",
                      help="follow until the rollout ends (exit 1 if it ends rolled back)")
    stat.add_argument("--interval", type=float, default=_DEFAULT_INTERVAL_S, metavar="S",
                      help=f"seconds between refreshes (default {_DEFAULT_INTERVAL_S:g})")

    for verb, text in (("pause", "stop moving forward (resume continues)"),
                       ("resume", "continue a paused rollout (the bake restarts)"),
                       ("promote", "end the current bake now and go to the next wave (refused "
                                   "while the wave is still applying)"),
                       ("abort", "stop here; nodes keep the version they have"),
                       ("rollback", "return every touched node to its previous version")):
        c = http.add_client_verb(acts, verb, functools.partial(_command, verb=verb), help=text,
                                 description=text[0].upper() + text[1:] + ".")
        c.add_argument("id", type=int, metavar="ID")


async def _request(hub: HubClient, method: str, path: str, **kw: Any) -> Any:
    """The JSON body; the hub's refusals raise their own errors (and exit codes)."""
    _, body = await hub.request_json(method, path, **kw)
    return body


def _check_online(plan: dict[str, Any], allow_offline: bool) -> None:
    """Refuse a start none of whose nodes is online (unless allowed); warn about offline ones."""
    nodes = [n for wave in plan["waves"] for n in wave]
    online = sum(1 for n in nodes if n["online"])
    if online == len(nodes):
        return
    if online == 0 and not allow_offline:
        raise NoNodeOnlineError(
            f"0 of {len(nodes)} selected nodes are online: the rollout would only wait for "
            "them. Check 'edge-hub nodes --selector ...', or pass --allow-offline to start "
            "anyway (nodes are upgraded as they return)")
    note(f"warning: {len(nodes) - online} of {len(nodes)} selected nodes are offline: they are "
         "skipped and upgraded when they return (for up to --offline-wait after the last wave)")


async def _start(args: argparse.Namespace) -> int:
    """Roll MODEL VERSION out to the camera nodes matching --selector: first --canary nodes,
    then cumulative --waves percentages, each baked for --bake and judged by every --gate;
    rolled back automatically when a gate fails, a node reports failed, or a node is not active
    within --deadline (without --gate only the last two roll back). Refused when none of the
    selected nodes is online, unless --allow-offline."""
    body = build_spec(args)
    async with client_from_args(args) as hub:
        plan = (await _request(hub, "POST", "/v1/rollouts", json={**body, "dry_run": True}))
        if args.dry_run:
            if args.json:
                print_json(plan)
            else:
                _console().print(view.plan_view(plan["plan"]))
            return 0
        _check_online(plan["plan"], args.allow_offline)
        out = await _request(hub, "POST", "/v1/rollouts", json={**body, "dry_run": False})
    if args.json:
        print_json(out)
        return 0
    r = out["rollout"]
    say(f"rollout {r['id']} started: {r['model']} {r['version']} to {r['nodes_total']} nodes "
        f"in {r['waves']} waves")
    return 0


def _console() -> Console:
    tty = sys.stdout.isatty()
    return Console(width=None if tty else 200, no_color=not tty, highlight=False)


async def _follow_id(hub: HubClient) -> int:
    """The rollout ``status --watch`` follows without an ID: the newest active, else the
    newest; NotFound when there is none."""
    rollouts = (await _request(hub, "GET", "/v1/rollouts?limit=100"))["rollouts"]
    if not rollouts:
        raise NotFound("no rollout yet: start one with 'edge-hub rollout start'")
    active = [r for r in rollouts if r["state"] not in TERMINAL_STATES]
    return int((active or rollouts)[0]["id"])


async def _status(args: argparse.Namespace) -> int:
    """Without ID: the latest rollouts (with --watch: follow the active rollout, else the
    latest). With ID: its state, wave, bake, gates against their limits, the new version beside
    the baseline, its nodes (previous and running version, health) and the last events."""
    if not args.interval > 0:
        raise InvalidRequest(f"--interval must be a positive number of seconds, got "
                             f"{args.interval:g}")
    async with client_from_args(args) as hub:
        if args.id is None and not args.watch:
            out = await _request(hub, "GET", "/v1/rollouts")
            if args.json:
                print_json(out)
            else:
                _console().print(view.summary_table(out["rollouts"]))
            return 0
        rid = args.id if args.id is not None else await _follow_id(hub)
        path = f"/v1/rollouts/{rid}"
        r = (await _request(hub, "GET", path))["rollout"]
        if not args.watch:
            if args.json:
                print_json(r)
            else:
                _console().print(view.render(r))
            return 0
        r = await _watch(hub, path, r, args)
    return 1 if r["state"] == "rolled_back" else 0


async def _watch(hub: HubClient, path: str, r: dict[str, Any],
                 args: argparse.Namespace) -> dict[str, Any]:
    """Follow a rollout until it ends: a live view on a terminal (the bake counts down between
    polls), else one plain line per change."""
    if sys.stdout.isatty() and not args.json:
        return await watch_live(hub, path, r, args.interval, _console())
    last = None
    while True:
        key = view.watch_key(r)
        if key != last and not args.json:
            say(view.watch_line(r))
            last = key
        if r["state"] in TERMINAL_STATES:
            break
        await asyncio.sleep(args.interval)
        r = (await _request(hub, "GET", path))["rollout"]
    if args.json:
        print_json(r)
    else:
        _console().print(view.render(r))
    return r


async def watch_live(hub: HubClient, path: str, r: dict[str, Any], interval: float,
                     console: Console) -> dict[str, Any]:
    """The terminal view: redrawn every second and after every poll, until ``r`` ends."""
    fetched = time.monotonic()
    with Live(view.render(r), console=console, refresh_per_second=4,
              auto_refresh=False) as live:
        next_poll = fetched + interval
        while r["state"] not in TERMINAL_STATES:
            await asyncio.sleep(max(0.0, min(1.0, next_poll - time.monotonic())))
            if time.monotonic() >= next_poll:
                r = (await _request(hub, "GET", path))["rollout"]
                fetched = time.monotonic()
                next_poll = fetched + interval
            live.update(view.render(r, time.monotonic() - fetched), refresh=True)
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
