"""run the agent: cameras -> inference -> results (until SIGTERM)

Run the agent with a YAML config (EDGE_AGENT_* environment variables override it). A bad config
prints every error as 'field: message (got value)' and exits 2 before anything starts; a model
that cannot load exits 1 with one line; SIGTERM or SIGINT drains in-flight work within
shutdown_timeout_s and exits 0; a root task that dies exits 1, so Kubernetes restarts the pod.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from edge_agent import config


def arguments(parser: argparse.ArgumentParser) -> None:
    """``--config``."""
    parser.add_argument("--config", "-c", default=None,
                        help="path to the agent's YAML config (default: environment only)")


def run(args: argparse.Namespace) -> int:
    """Load the settings, configure logging, run the agent; return the exit status."""
    settings = config.load_settings(args.config)  # ConfigError: the scaffold prints each field
    from edge_agent.app.compose import run_agent  # noqa: PLC0415
    from edge_agent.common.logs import configure_logging  # noqa: PLC0415

    configure_logging(settings.log.level, settings.log.json_lines)
    return asyncio.run(run_agent(settings, Path(args.config) if args.config else None))
