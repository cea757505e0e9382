"""``edge-agent``: the agent's command line.

Each verb lives in its own module under ``edge_agent.commands`` (its docstring, ``arguments``
and ``run``); the scaffold (``edge_agent.common.cli``) builds the parser and turns any
``AgentError`` into its exit code and one line on stderr (a line per field for a config error),
never a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from edge_agent import __version__
from edge_agent.common import cli
from edge_agent.errors import AgentError

PROGRAM = cli.Program(
    prog="edge-agent",
    description="Edge inference agent: cameras -> ONNX Runtime -> results over MQTT.",
    version=__version__,
    commands="edge_agent.commands",
    verbs=("run", "infer", "batch", "validate_config", "schemas"),
    error=AgentError,
)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``edge-agent`` console script; returns the exit status."""
    return cli.main(PROGRAM, argv)


if __name__ == "__main__":
    sys.exit(main())
