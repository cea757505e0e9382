"""How the ``edge-hub`` client verbs print: tables for people, JSON for scripts, progress bars.

Tables and progress bars use rich; JSON goes to stdout unadorned (``--json``) so it can be
piped into ``jq``. Progress bars are drawn on stderr and only when it is a terminal, so logs and
CI output stay clean.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import orjson
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from hub.client.http import Progress as ProgressCallback


def _print(renderable: Any) -> None:
    """Print to stdout: styled on a terminal; plain, unwrapped, right-trimmed off it."""
    if sys.stdout.isatty():
        Console(highlight=False).print(renderable)
        return
    # off a terminal rich assumes 80 columns and wraps cells; a pipe has no width limit
    buf = io.StringIO()
    Console(file=buf, width=200, no_color=True, highlight=False).print(renderable)
    sys.stdout.write("\n".join(line.rstrip() for line in buf.getvalue().splitlines()) + "\n")
    sys.stdout.flush()


def print_json(obj: Any) -> None:
    """Pretty JSON on stdout."""
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode() + "\n")
    sys.stdout.flush()


def print_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> None:
    """A table on stdout (plain text off a terminal)."""
    table = Table(title=title or None, box=None, header_style="bold", pad_edge=False)
    for c in columns:
        table.add_column(c, overflow="fold")
    for r in rows:
        table.add_row(*("" if v is None else str(v) for v in r))
    _print(table)


def print_fields(fields: Sequence[tuple[str, Any]]) -> None:
    """Key/value lines for one object."""
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for k, v in fields:
        table.add_row(k, "" if v is None else str(v))
    _print(table)


def say(line: str) -> None:
    """A result line on stdout."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def note(message: str) -> None:
    """A line for people on stderr."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def human_size(n: int) -> str:
    """Bytes as B/KiB/MiB/GiB with one decimal."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def short_time(iso: str) -> str:
    """An ISO timestamp as 'YYYY-MM-DD HH:MM' UTC."""
    try:
        return dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return iso


class _BinarySpeed(ProgressColumn):
    """Transfer speed in KiB/s and MiB/s, the units of every other size this CLI prints."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("?" if speed is None else human_size(int(speed)) + "/s",
                    style="progress.data.speed")


def transfer_columns() -> list[ProgressColumn]:
    """The columns of a transfer bar: what, how far, how much (KiB/MiB), how fast, how long."""
    return [TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
            _BinarySpeed(), TimeRemainingColumn()]


@contextlib.contextmanager
def progress_bar(total: int, description: str) -> Iterator[ProgressCallback | None]:
    """A transfer progress bar on stderr when it is a terminal; yields the advance callback."""
    if not sys.stderr.isatty():
        yield None
        return
    with Progress(
        *transfer_columns(),
        console=Console(file=sys.stderr),
        transient=False,
    ) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)
