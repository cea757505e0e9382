"""``edge-hub``: the hub's command line (server, registry, rollouts, fleet, results).

Each verb group lives in its own module under ``hub.commands`` with ``register(subparsers)``. Any
``HubError`` becomes one line on stderr and its exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from hub import __version__
from hub.errors import HubError

#: Verb modules, in the order ``--help`` lists them.
_VERBS: tuple[str, ...] = ("serve", "models", "keygen", "results", "rollout", "nodes")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every verb registered."""
    parser = argparse.ArgumentParser(
        prog="edge-hub",
        description="Edge hub: model registry, rollouts to camera nodes, telemetry.",
    )
    parser.add_argument("--version", action="version", version=f"edge-hub {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="COMMAND", required=True)
    for name in _VERBS:
        importlib.import_module(f"hub.commands.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``edge-hub`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc: int = args.func(args)
    except HubError as exc:
        print(f"edge-hub: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return rc


if __name__ == "__main__":
    sys.exit(main())
