"""``edge-agent``: the agent's command line.

Each verb lives in its own module under ``edge_agent.commands`` with ``register(subparsers)``; heavy
imports (onnxruntime, OpenCV) happen inside the verb, so ``--help`` stays fast. Any
``AgentError`` becomes one line on stderr and its exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from edge_agent import __version__
from edge_agent.errors import AgentError

#: Verb modules, in the order ``--help`` lists them.
_VERBS = ("run", "infer", "batch", "validate_config")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every verb registered."""
    parser = argparse.ArgumentParser(
        prog="edge-agent",
        description="Edge inference agent: cameras -> ONNX Runtime -> results over MQTT.",
    )
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="COMMAND", required=True)
    for name in _VERBS:
        importlib.import_module(f"edge_agent.commands.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``edge-agent`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc: int = args.func(args)
    except AgentError as exc:
        print(f"edge-agent: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return rc


if __name__ == "__main__":
    sys.exit(main())
