"""A command-line ``main`` run in this process, as a user would run it, with its output kept.

The CLI tests run the verbs in-process (the console script's code path minus the interpreter
start-up) against real servers in child processes; this runs one verb with the given
environment, captures stdout and stderr, turns argparse's ``SystemExit`` into the exit code, and
puts the environment back afterwards.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass
class Result:
    """What a user would see: the exit code and both streams."""

    returncode: int
    stdout: str
    stderr: str


def run_main(main: Callable[[list[str]], int], argv: Sequence[str], *,
             env: dict[str, str] | None = None, clear_prefix: str | None = None) -> Result:
    """``main(argv)`` with ``env`` set (and every variable starting with ``clear_prefix``
    removed first); the process environment is restored whatever happens."""
    saved = dict(os.environ)
    if clear_prefix:
        for k in [k for k in os.environ if k.startswith(clear_prefix)]:
            del os.environ[k]
    os.environ.update(env or {})
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(list(argv))
            except SystemExit as exc:  # argparse usage errors
                rc = int(exc.code or 0)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return Result(rc, out.getvalue(), err.getvalue())
