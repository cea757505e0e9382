"""``edge-hub``: the hub's command line (server, registry, rollouts, fleet, results, events).

Each verb group lives in its own module under ``hub.commands`` with ``register(subparsers)``;
the scaffold (``edge_agent.common.cli``) builds the parser and turns any ``HubError`` into its
exit code and one line on stderr (a line per field for a config error), never a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from edge_agent.common import cli
from hub import __version__
from hub.errors import HubError

PROGRAM = cli.Program(
    prog="edge-hub",
    description="Edge hub: model registry, rollouts to camera nodes, telemetry.",
    version=__version__,
    commands="hub.commands",
    verbs=("serve", "models", "keygen", "pki", "results", "events", "rollout", "nodes", "db"),
    error=HubError,
)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``edge-hub`` console script; returns the exit status."""
    return cli.main(PROGRAM, argv)


if __name__ == "__main__":
    sys.exit(main())
