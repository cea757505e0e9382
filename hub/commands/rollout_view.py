"""How ``edge-hub rollout`` shows a rollout: the dry-run plan, the list, the live view, log lines.

Kept apart from the verbs (``hub/commands/rollout.py``) because it only turns the API's JSON into
rich renderables and text. One wave numbering everywhere: waves are numbered 1..N as the API's
``progress.wave`` gives them (index + 1), and wave 1 is marked ``(canary)`` when the rollout has
a canary; the plan, the node table, the header, the shadow line and the event log all say the
same. ``render`` takes the seconds since the JSON was fetched so that a live view counts the
bake down between two polls.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

#: Events shown under the live view (the API returns up to 50).
EVENTS_SHOWN = 8
#: The wave's figures shown beside the baseline's, in this order.
FIGURES = (("p50_ms", "p50 ms", 1), ("p95_ms", "p95 ms", 1), ("p99_ms", "p99 ms", 1),
           ("error_rate", "error rate", 4), ("fps", "fps", 1),
           ("detections_per_frame", "detections/frame", 2), ("score_p50", "score p50", 3))


def has_canary(spec: dict[str, Any]) -> bool:
    """Whether wave 1 is a canary (the hub's ``plan_waves`` rule)."""
    return spec.get("canary_percent") is not None or (spec.get("canary") or 0) > 0


def wave_name(index: int, canary: bool) -> str:
    """Wave ``index`` (0-based, as stored) as shown: ``1 (canary)``, ``2``, ..."""
    return f"{index + 1} (canary)" if canary and index == 0 else str(index + 1)


def duration(seconds: float | None) -> str:
    """``45s``, ``4m05s``, ``1h02m`` (``-`` for None)."""
    if seconds is None:
        return "-"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def num(v: Any, digits: int = 1) -> str:
    """A figure with ``digits`` decimals (``-`` when missing)."""
    return "-" if not isinstance(v, (int, float)) or isinstance(v, bool) else f"{v:.{digits}f}"


def spec_lines(spec: dict[str, Any]) -> list[str]:
    """The whole spec in a few lines: waves and percentages, bake, deadline, gates, shadow."""
    canary = (f"canary {spec['canary_percent']:g}% of the nodes"
              if spec.get("canary_percent") is not None
              else f"canary {spec['canary']} node{'s' if spec.get('canary') != 1 else ''}"
              if spec.get("canary") else "no canary")
    waves = ", ".join(f"{p:g}%" for p in spec.get("waves", []))
    gates = ", ".join(spec.get("gates") or []) or \
        "none (only a node reporting failed or missing its deadline rolls back)"
    lines = [f"waves: {canary}, then {waves} of the selected nodes (cumulative)",
             f"bake {duration(spec.get('bake_s'))} per wave, judged after "
             f"{spec.get('min_samples')} telemetry messages per node; deadline "
             f"{duration(spec.get('deadline_s'))} per node to report active; offline nodes "
             f"awaited {duration(spec.get('offline_wait_s'))} after the last wave",
             f"gates: {gates}"]
    shadow = spec.get("shadow")
    if shadow:
        lines.append(f"each wave starts with a shadow phase: {shadow['gate']} over at least "
                     f"{shadow['min_samples']} compared frames, within {shadow['timeout_s']:g}s")
    return lines


def plan_view(plan: dict[str, Any]) -> Group:
    """The dry run: the spec, then which node is in which wave (and whether it can shadow)."""
    spec = plan.get("spec") or {}
    shadow = plan.get("shadow")
    canary = has_canary(spec)
    head = Text(f"plan: {plan['model']} -> {plan['version']}  selector "
                f"'{plan.get('selector', '')}'  {len(plan['waves'])} waves (dry run, nothing "
                "changed)\n", style="bold")
    head.append("\n".join(spec_lines(spec)), style="")
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("WAVE", "NODE", "CURRENT", "ONLINE", *(("SHADOW",) if shadow else ())):
        table.add_column(col)
    for i, wave in enumerate(plan["waves"]):
        for n in wave:
            row = [wave_name(i, canary), n["node"], n["current_version"] or "-",
                   "yes" if n["online"] else "no"]
            if shadow:
                cur = n["current_version"]
                row.append("compare" if cur not in (None, plan["version"])
                           else "no (nothing to compare with)")
            table.add_row(*row)
    return Group(head, table)


def summary_table(rollouts: list[dict[str, Any]]) -> Table:
    """``rollout status`` without an ID: the latest rollouts."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("ID", "MODEL", "VERSION", "SELECTOR", "STATE", "WAVE", "NODES", "CAUSE"):
        table.add_column(col)
    for r in rollouts:
        cause = (r.get("cause") or {}).get("reason", "")
        table.add_row(str(r["id"]), r["model"], r["version"], r["selector"], r["state"],
                      f"{min(r['wave'] + 1, r['waves'])}/{r['waves']}", str(r["nodes_total"]),
                      cause)
    return table


def _wave_of(r: dict[str, Any]) -> str:
    """``wave 2/4`` or ``wave 1/4 (canary)``."""
    canary = has_canary(r.get("spec") or {})
    number = min(r["wave"] + 1, r["waves"])
    return f"wave {number}/{r['waves']}" + (" (canary)" if canary and r["wave"] == 0 else "")


def bake_text(r: dict[str, Any], since_fetch: float = 0.0) -> str:
    """``bake 1m20s of 5m00s, 3m40s left`` while baking; else empty."""
    bake = (r.get("progress") or {}).get("bake")
    if not bake or r["state"] in ("succeeded", "aborted", "rolled_back"):
        return ""
    elapsed = min(bake["bake_s"], bake["elapsed_s"] + since_fetch)
    left = max(0.0, bake["remaining_s"] - since_fetch)
    return f"bake {duration(elapsed)} of {duration(bake['bake_s'])}, {duration(left)} left"


def _verdict(ok: bool | None) -> Text:
    if ok is True:
        return Text("pass", style="green")
    if ok is False:
        return Text("FAIL", style="bold red")
    return Text("pending", style="yellow")


def gate_table(r: dict[str, Any]) -> Table | Text:
    """Every gate: its value now against its limit, pass/fail, the nodes and samples behind it."""
    progress = r.get("progress") or {}
    gates = progress.get("gates") or []
    if not gates:
        return Text("gates: none (only a node reporting failed or missing its deadline rolls "
                    "back)")
    judged = progress.get("judged") or {}
    counted = (f"{judged['ready']}/{judged['nodes']} nodes, {judged['samples']} samples "
               f"(min {judged['min_samples']}/node)") if judged else "-"
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("GATE", "VALUE", "LIMIT", "BASELINE", "RESULT", "COUNTED", "NOTE"):
        table.add_column(col)
    for g in gates:
        digits = 4 if g["metric"] in ("error_rate", "class_shift", "score_p50") else 2
        value = num(g.get("value"), digits) + (f" ({g['node']})" if g.get("node") else "")
        table.add_row(g["gate"], value, f"{g['op']} {num(g.get('limit'), digits)}",
                      num(g.get("baseline"), digits), _verdict(g.get("ok")), counted,
                      g.get("message") or "")
    return table


def figures_table(r: dict[str, Any]) -> Table | None:
    """This wave's figures beside the baseline's (the nodes not on the new version)."""
    progress = r.get("progress") or {}
    wave, base = progress.get("canary"), progress.get("baseline") or {}
    if not wave and not any(base.get(k) is not None for k, _, _ in FIGURES):
        return None
    wave = wave or {}
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("FIGURE", f"NEW ({r['version']})", "BASELINE"):
        table.add_column(col)
    for key, label, digits in FIGURES:
        if wave.get(key) is None and base.get(key) is None:
            continue
        table.add_row(label, num(wave.get(key), digits), num(base.get(key), digits))
    return table


def nodes_table(r: dict[str, Any]) -> Table:
    """One row per node: wave, rollout status, previous version, running version, health."""
    canary = has_canary(r.get("spec") or {})
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("WAVE", "NODE", "STATUS", "PREVIOUS", "RUNNING", "ONLINE", "P99 MS", "ERR %",
                "FPS", "NOTE"):
        table.add_column(col)
    for n in r["nodes"]:
        live = n.get("live") or {}
        m = live.get("metrics") or {}
        err = m.get("error_rate")
        running = live.get("running") or "-"
        if live.get("status") and live["status"] != "active":
            running += f" ({live['status']})"
        prev = (n.get("prev_version") or "none") if n.get("prev_recorded") else "-"
        table.add_row(wave_name(n["wave"], canary), n["node"], n["status"], prev, running,
                      "yes" if live.get("online") else "no", num(m.get("p99_ms")),
                      num(err * 100 if err is not None else None, 2), num(m.get("fps")),
                      n.get("error") or "")
    return table


def event_text(ev: dict[str, Any], canary: bool) -> str:
    """One event as a line: the time, what happened (waves named as everywhere else), and its
    scalar details."""
    kind = str(ev.get("kind", "")).replace("_", " ")
    detail = {k: v for k, v in ev.items() if k not in ("ts", "kind")}
    text = kind
    if isinstance(detail.get("wave_index"), int):
        wave = f"wave {wave_name(detail.pop('wave_index'), canary)}"
        text = (f"{wave} {kind.removeprefix('wave ')}" if kind.startswith("wave ")
                else f"{kind} ({wave})")
    extra = " ".join(f"{k}={v}" for k, v in detail.items()
                     if isinstance(v, (str, int, float, bool)) and v != "")
    when = time.strftime("%H:%M:%S", time.localtime(ev["ts"])) if ev.get("ts") else "--:--:--"
    return f"{when}  {text}" + (f"  {extra}" if extra else "")


def agreement(f: dict[str, Any]) -> str:
    """``0.953 [0.931, 0.969]`` (the Wilson 95 % interval), or ``-`` before any frame."""
    if f.get("agreement") is None:
        return "-"
    return f"{f['agreement']:.3f} [{f['ci_low']:.3f}, {f['ci_high']:.3f}]"


def shadow_view(s: dict[str, Any], canary: bool) -> Group:
    """The shadow phase: gate, pooled agreement with its interval, samples, and per node."""
    style = {"failed": "red", "passed": "green"}.get(s.get("state", ""), "")
    line = Text(f"shadow (wave {wave_name(s.get('wave', 0), canary)}, {s.get('state')}): "
                f"{s.get('gate')}  agreement {agreement(s)}  {s.get('samples', 0)}/"
                f"{s.get('min_samples')} frames compared  timeout "
                f"{s.get('timeout_s') or 0:g}s", style=style)
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("SHADOW NODE", "STATUS", "COMPARED", "AGREEMENT [95% CI]"):
        table.add_column(col)
    for name, f in (s.get("nodes") or {}).items():
        table.add_row(name, f.get("status") or "-", str(f.get("samples", 0)), agreement(f))
    return Group(line, table)


def render(r: dict[str, Any], since_fetch: float = 0.0) -> Group:
    """The live view of one rollout, top to bottom: state and wave, bake, gates, the new
    version against the baseline, the shadow phase, the nodes, the last events."""
    canary = has_canary(r.get("spec") or {})
    head = Text()
    head.append(f"rollout {r['id']}  ", style="bold")
    head.append(f"{r['model']} -> {r['version']}  selector '{r['selector']}'  ")
    head.append(r["state"], style="bold")
    head.append(f"  {_wave_of(r)}")
    if r.get("message") and r["message"] != r["state"]:
        head.append(f"  ({r['message']})")
    bake = bake_text(r, since_fetch)
    if bake:
        head.append(f"\n{bake}")
    if r.get("cause"):
        head.append("\ncause: " + ", ".join(f"{k}={v}" for k, v in r["cause"].items()),
                    style="red")
    parts: list[RenderableType] = [head, gate_table(r)]
    figs = figures_table(r)
    if figs is not None:
        parts.append(figs)
    if r.get("shadow"):
        parts.append(shadow_view(r["shadow"], canary))
    parts.append(nodes_table(r))
    events = (r.get("events") or [])[-EVENTS_SHOWN:]
    if events:
        parts.append(Text("events:\n" + "\n".join("  " + event_text(e, canary)
                                                  for e in events)))
    return Group(*parts)


def watch_key(r: dict[str, Any]) -> tuple[Any, ...]:
    """What a plain (non-terminal) watch prints a new line for when it changes."""
    sh = r.get("shadow") if r["state"] == "shadowing" else None
    gates = tuple(g.get("ok") for g in (r.get("progress") or {}).get("gates") or [])
    return (r["state"], r["wave"], tuple(sorted(r["node_counts"].items())), gates,
            sh and (sh.get("state"), sh.get("samples")))


def watch_line(r: dict[str, Any]) -> str:
    """One plain line of a watch: state, wave, node counts, bake, gates, shadow."""
    parts = [f"{time.strftime('%H:%M:%S')} rollout {r['id']} {r['state']} {_wave_of(r)} "
             + " ".join(f"{k}={v}" for k, v in sorted(r["node_counts"].items()))]
    bake = bake_text(r)
    if bake:
        parts.append(bake)
    for g in (r.get("progress") or {}).get("gates") or []:
        word = {True: "pass", False: "FAIL"}.get(g.get("ok"), "pending")
        digits = 4 if g["metric"] in ("error_rate", "class_shift", "score_p50") else 2
        parts.append(f"{g['gate']}: {num(g.get('value'), digits)} {word}")
    sh = r.get("shadow") if r["state"] == "shadowing" else None
    if sh:
        parts.append(f"shadow agreement={agreement(sh)} "
                     f"compared={sh.get('samples', 0)}/{sh.get('min_samples')}")
    return "  ".join(p for p in parts if p)
