"""How the demo shows itself: a live table on a terminal (rich), plain timestamped lines otherwise.

Both views get the same snapshots: the phase, one row per node (running version from the hub,
results, fps and latency from the results stream) and the rollout as the hub reports it. Plain
output prints a line when the rollout changes and the fleet every few seconds, so a log or a CI
transcript reads as a story without a flood.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from demo.watch import NodeFigures


@dataclass
class NodeRow:
    """One node: what the hub says it runs, and what its results show."""

    node: str
    online: bool
    version: str | None
    status: str | None
    target: str | None
    figures: NodeFigures


@dataclass
class Snapshot:
    """Everything one refresh shows."""

    phase: str
    rows: list[NodeRow] = field(default_factory=list)
    rollout: dict[str, Any] | None = None


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _running(row: NodeRow) -> str:
    if row.version is None and row.status is None:
        return "-"
    text = row.version or "-"
    if row.status and row.status != "active":
        text += f" ({row.status}" + (f" {row.target}" if row.target else "") + ")"
    return text


def _wave_name(i: int, waves: int) -> str:
    if i == 0:
        return "canary"
    return "all" if i == waves - 1 else f"wave {i}"


def rollout_line(r: dict[str, Any]) -> str:
    """One line: id, versions, state, wave, each node's progress, the cause when rolled back."""
    wave = min(r["wave"], r["waves"] - 1)
    nodes = " ".join(f"{n['node']}={n['status']}" for n in r["nodes"])
    line = (f"rollout {r['id']} {r['model']} -> {r['version']}: {r['state']}, "
            f"wave {wave + 1}/{r['waves']} ({_wave_name(wave, r['waves'])}): {nodes}")
    if r.get("message") and r["message"] != r["state"]:
        line += f" [{r['message']}]"
    if r.get("cause"):
        line += f" (cause: {cause_text(r['cause'])})"
    return line


def cause_text(cause: dict[str, Any]) -> str:
    """Why a rollout stopped, in words when the hub gave them."""
    if cause.get("message"):
        return str(cause["message"])
    return ", ".join(f"{k}={v}" for k, v in cause.items())


def node_line(row: NodeRow) -> str:
    """One node in plain text."""
    f = row.figures
    return (f"  {row.node}: {'online' if row.online else 'offline'} model={_running(row)} "
            f"results={f.delivered} fps={f.fps:.1f} p50={_ms(f.p50_ms)}ms "
            f"p99={_ms(f.p99_ms)}ms")


class Display:
    """Progress output; ``live`` selects the rich view (a terminal) over plain lines."""

    def __init__(self, stream: TextIO, *, live: bool, plain_every_s: float = 5.0) -> None:
        self.stream = stream
        self.t0 = time.monotonic()
        self.plain_every_s = plain_every_s
        self.console = Console(file=stream, highlight=False, soft_wrap=not live,
                               force_terminal=live or None, no_color=not live)
        self.live = live
        #: Started on the first ``show()``: its refresh thread must not exist while the demo
        #: still forks its long-lived children.
        self._live: Live | None = None
        self._last_rollout: tuple[Any, ...] | None = None
        self._last_nodes = 0.0

    def _stamp(self) -> str:
        return f"[{time.monotonic() - self.t0:6.1f}s]"

    def step(self, text: str, *detail: str, bold: bool = False) -> None:
        """A progress line (and indented detail lines)."""
        if self.live:
            self.console.print(Text(self._stamp() + " ", style="dim")
                               + Text(text, style="bold" if bold else ""))
            for d in detail:
                self.console.print(Text("          " + d, style="dim"))
        else:
            self.stream.write(f"{self._stamp()} {text}\n")
            for d in detail:
                self.stream.write(f"          {d}\n")
            self.stream.flush()

    def show(self, snap: Snapshot) -> None:
        """Refresh the live view, or print what changed (plain)."""
        if self.live:
            if self._live is None:
                self._live = Live(self._render(snap), console=self.console,
                                  refresh_per_second=4, transient=True)
                self._live.start()
            else:
                self._live.update(self._render(snap))
            return
        r = snap.rollout
        if r is not None:
            key = (r["state"], r["wave"], tuple(n["status"] for n in r["nodes"]),
                   r.get("message"))
            if key != self._last_rollout:
                self._last_rollout = key
                self.step(rollout_line(r))
        now = time.monotonic()
        if any(row.online for row in snap.rows) and \
                now - self._last_nodes >= self.plain_every_s:
            self._last_nodes = now
            self.stream.write("".join(node_line(row) + "\n" for row in snap.rows))
            self.stream.flush()

    def _render(self, snap: Snapshot) -> Group:
        head = Text(f"{self._stamp()} ", style="dim")
        head.append(snap.phase, style="bold")
        table = Table(box=None, header_style="bold", pad_edge=False)
        for col in ("NODE", "ONLINE", "RUNNING", "RESULTS", "FPS", "P50 MS", "P99 MS",
                    "ROLLOUT"):
            table.add_column(col, justify="right" if col in (
                "RESULTS", "FPS", "P50 MS", "P99 MS") else "left")
        progress: dict[str, str] = {}
        if snap.rollout is not None:
            for n in snap.rollout["nodes"]:
                progress[n["node"]] = (f"{_wave_name(n['wave'], snap.rollout['waves'])}: "
                                       f"{n['status']}")
        for row in snap.rows:
            f = row.figures
            table.add_row(row.node, "yes" if row.online else "no", _running(row),
                          str(f.delivered), f"{f.fps:.1f}", _ms(f.p50_ms), _ms(f.p99_ms),
                          progress.get(row.node, ""))
        parts: list[Any] = [head, table]
        if snap.rollout is not None:
            parts.append(Text(rollout_line(snap.rollout), style="cyan"))
        return Group(*parts)

    def pause_live(self) -> None:
        """Stop the live region (before printing the summary); ``show()`` starts it again."""
        if self._live is not None:
            self._live.stop()
            self._live = None

    def close(self) -> None:
        """Leave the terminal as it was; later lines are printed plainly."""
        self.pause_live()
        self.live = False


def summary_text(s: dict[str, Any]) -> str:
    """The summary as aligned plain text (the rich view prints the same table)."""
    r = s["rollout"]
    lines = [
        "",
        f"summary ({s['elapsed_s']:.0f} s): rollout {r['id']} of {r['model']} "
        f"{r['from_version']} -> {r['version']}: {r['state'].upper()}"
        + (f" ({r['duration_s']:.0f} s, gates: {', '.join(r['gates']) or 'none'})"),
    ]
    if r.get("cause"):
        lines.append(f"  cause: {cause_text(r['cause'])}")
    header = ("NODE", "VERSION", "FPS", "P50 MS", "P99 MS", "RESULTS DELIVERED")
    rows = [header] + [
        (n["node"], n["version"] or "-", f"{n['fps']:.1f}", _ms(n["p50_ms"]),
         _ms(n["p99_ms"]), str(n["results"]))
        for n in s["nodes"]
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        cells = [c.ljust(w) if i == 0 else c.rjust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append(("  " + "  ".join(cells)).rstrip())
    res = s["results"]
    lines.append(f"  results on MQTT: {res['delivered']} delivered, {res['duplicates']} "
                 f"duplicates dropped, {res['missing']} missing (seq gaps), "
                 f"{res['resets']} seq resets (an outbox replaced, not a loss)")
    lines.append("  latency: end to end per frame (capture to result), over the last "
                 f"{s['window_s']:.0f} s of each node's results")
    return "\n".join(lines)
