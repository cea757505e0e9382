"""The demo's command line: its options, checked, and the work dir they choose.

Kept apart from the orchestrator (``demo/run.py``) so that the one module is about the steps of
the demo and this one about how a user asks for them.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from demo.procs import DemoError

#: Gates that pass on any healthy machine, loaded or not (the point is the mechanism; try
#: ``--gate 'p99_ms<=1'`` to watch an automatic rollback).
DEFAULT_GATES = ("error_rate<=0.01", "p99_ms<=1000")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The options of ``argv``; exit 2 with a usage message when they are wrong."""
    p = argparse.ArgumentParser(
        prog="demo/run.py",
        description="Local demo: an MQTT broker, the hub with three static nodes and three "
        "agents on this machine; two model versions pushed; v2 rolled out canary -> all with "
        "health gates; live progress, a summary, then results keep flowing until Ctrl-C.",
    )
    p.add_argument("--exit-after-summary", action="store_true",
                   help="stop everything after the summary instead of waiting for Ctrl-C")
    p.add_argument("--workdir", type=Path, metavar="DIR",
                   help="work in DIR (new or empty; kept afterwards) instead of a temp dir")
    p.add_argument("--keep", action="store_true",
                   help="keep the temporary work dir (configs, logs, databases) at the end")
    p.add_argument("--json", action="store_true",
                   help="print the summary as one JSON object on stdout (progress on stderr)")
    p.add_argument("--gate", action="append", metavar="GATE",
                   help="rollout gate, repeatable (default: "
                   + " and ".join(DEFAULT_GATES) + "); e.g. 'p99_ms<=1' to see a rollback")
    p.add_argument("--bake", type=float, default=5.0, metavar="S",
                   help="seconds each wave runs before it is judged (default 5)")
    p.add_argument("--fps", type=float, default=5.0,
                   help="frames per second each agent processes (default 5)")
    p.add_argument("--rollout-timeout", type=float, default=180.0, metavar="S",
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.fps <= 0 or args.bake < 0:
        p.error("--fps must be > 0 and --bake >= 0")
    return args


def workdir(args: argparse.Namespace) -> tuple[Path, bool]:
    """The work dir and whether to remove it at the end (DemoError: not new or empty)."""
    if args.workdir is None:
        return Path(tempfile.mkdtemp(prefix="edge-demo-")), not args.keep
    wd = args.workdir.resolve()
    if wd.exists() and any(wd.iterdir()):
        raise DemoError(f"--workdir {wd} is not empty (a fresh folder keeps runs apart)")
    wd.mkdir(parents=True, exist_ok=True)
    return wd, False
