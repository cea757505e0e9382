"""check a config file (and EDGE_AGENT_* env) and the files it names; print every error

Validate a config file together with EDGE_AGENT_* environment variables, without starting
anything: the settings and their cross-field checks, then the files the config names (TLS
certificates and keys, the CA bundles, tokens, the signing key): each must be readable, and a
key, token or password file must not be readable by other users (secret_files). With
identity.bootstrap on, the node's certificate and key are not expected yet: the bootstrap writes
them at start. Prints each error as 'field: message (got value)' and exits 2; prints 'ok' and
exits 0 when the config is usable. Off the box the config is for (CI, a laptop), --no-files
checks the config alone.
"""

from __future__ import annotations

import argparse

from edge_agent import config
from edge_agent.config.files import file_problems


def arguments(parser: argparse.ArgumentParser) -> None:
    """The config file to check, and whether to look at the files it names."""
    parser.add_argument("config", help="path to the agent's YAML config file")
    parser.add_argument("--no-files", action="store_true",
                        help="check the settings only, not the files they name (for a config "
                        "written for another machine, e.g. the K3s one in CI)")


def run(args: argparse.Namespace) -> int:
    """Print ``ok`` (exit 0); a ``ConfigError`` is printed a line per field by the scaffold."""
    settings = config.load_settings(args.config)
    if not args.no_files:
        problems = file_problems(settings)
        if problems:
            raise config.ConfigError(problems)
    print(f"ok: node={settings.node} models={len(settings.models)} cameras={len(settings.cameras)}")
    return 0
