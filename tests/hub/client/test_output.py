"""What the CLI prints for people: one unit system for sizes and speeds."""

from __future__ import annotations

import io
import re

from rich.console import Console
from rich.progress import Progress

from hub.client import output


def test_transfer_columns_use_binary_units_like_every_other_size() -> None:
    buf = io.StringIO()
    console = Console(file=buf, width=200, force_terminal=False, color_system=None)
    columns = output.transfer_columns()
    with Progress(*columns, console=console, auto_refresh=False) as progress:
        task = progress.add_task("push det 2", total=50 * 1024 * 1024)
        progress.update(task, completed=20 * 1024 * 1024)
        progress.refresh()
    screen = buf.getvalue()
    assert "20.0/50.0 MiB" in screen, screen
    assert not re.search(r"\d ?(kB|MB|GB)\b", screen), screen
    assert output.human_size(20 * 1024 * 1024) == "20.0 MiB"
