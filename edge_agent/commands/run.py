"""run the agent: cameras -> inference -> results (until SIGTERM)

Run the agent with a YAML config (EDGE_AGENT_* environment variables override it). A bad config
prints every error as 'field: message (got value)' and exits 2 before anything starts; a model
that cannot load exits 1 with one line; SIGTERM or SIGINT drains in-flight work within
shutdown_timeout_s and exits 0; a root task that dies exits 1, so Kubernetes restarts the pod.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

import structlog

from edge_agent import config

log = structlog.get_logger(__name__)


def arguments(parser: argparse.ArgumentParser) -> None:
    """``--config``."""
    parser.add_argument("--config", "-c", default=None,
                        help="path to the agent's YAML config (default: environment only)")


def run(args: argparse.Namespace) -> int:
    """Load the settings, configure logging, run the agent; return the exit status."""
    from edge_agent.inference.engine import limit_heap_arenas  # noqa: PLC0415

    limit_heap_arenas()  # before any thread has a heap of its own (docs/deploy.md "Sizing")
    settings = config.load_settings(args.config)  # ConfigError: the scaffold prints each field
    from edge_agent.app.compose import run_agent  # noqa: PLC0415
    from edge_agent.common.logs import configure_logging  # noqa: PLC0415

    configure_logging(settings.log.level, settings.log.json_lines)
    for message in startup_warnings(settings, args.config, os.environ):
        log.warning("startup_warning", message=message)
    return asyncio.run(run_agent(settings, Path(args.config) if args.config else None))


def startup_warnings(settings: config.AgentSettings, config_path: str | None,
                     environ: os._Environ[str] | dict[str, str]) -> list[str]:
    """What a person starting the agent should know before it runs: no config at all, nothing
    to do, or state written to the default host paths under /var/lib."""
    out = []
    if config_path is None and not any(k.startswith("EDGE_AGENT_") for k in environ):
        out.append("no --config and no EDGE_AGENT_* variables: running on defaults alone "
                   "(see 'edge-agent run --help' and docs/configuration.md)")
    if not settings.cameras:
        out.append("no cameras configured: this agent will produce no results")
    if not settings.models:
        out.append("no models configured: it serves only what the hub's desired state assigns")
    defaults = config.AgentSettings.model_construct()
    at_default = [str(p) for p, d in ((settings.outbox.path, defaults.outbox.path),
                                      (settings.hub.cache_dir, defaults.hub.cache_dir))
                  if p == d]
    if config_path is None and at_default:
        out.append(f"state goes to the default host paths {', '.join(at_default)}")
    return out
