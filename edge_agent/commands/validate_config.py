"""``edge-agent validate-config FILE``: check a config without starting anything."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from edge_agent.config import ConfigError, load_settings


def register(sub: Any) -> None:
    """Add the ``validate-config`` verb."""
    p = sub.add_parser(
        "validate-config",
        help="check a config file (and EDGE_AGENT_* env) and print every error",
        description="Validate a config file together with EDGE_AGENT_* environment variables. "
        "Prints each error as 'field: message (got value)' and exits 2; prints 'ok' and exits 0 "
        "when the config is usable.",
    )
    p.add_argument("config", help="path to the agent's YAML config file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print every config error (exit 2) or ``ok`` (exit 0)."""
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        for path, msg, value in exc.errors:
            print(f"{path}: {msg} (got {value!r})", file=sys.stderr)
        return 2
    print(f"ok: node={settings.node} models={len(settings.models)} cameras={len(settings.cameras)}")
    return 0
