"""check a config file (and EDGE_AGENT_* env) and print every error

Validate a config file together with EDGE_AGENT_* environment variables, without starting
anything. Prints each error as 'field: message (got value)' and exits 2; prints 'ok' and exits 0
when the config is usable.
"""

from __future__ import annotations

import argparse

from edge_agent import config


def arguments(parser: argparse.ArgumentParser) -> None:
    """The config file to check."""
    parser.add_argument("config", help="path to the agent's YAML config file")


def run(args: argparse.Namespace) -> int:
    """Print ``ok`` (exit 0); a ``ConfigError`` is printed a line per field by the scaffold."""
    settings = config.load_settings(args.config)
    print(f"ok: node={settings.node} models={len(settings.models)} cameras={len(settings.cameras)}")
    return 0
