"""``edge-hub serve``: run the hub's HTTP API (registry now; rollouts and fleet hook in).

Settings come from ``--config`` plus ``EDGE_HUB_*`` environment variables; the few flags here
(``--host``, ``--port``, ``--data-dir``, ``--token-file``, the TLS files) override both, for a
quick start without a config file. The hub serves HTTPS: it needs ``--tls-cert-file`` and
``--tls-key-file`` (``edge-hub pki issue NAME --role server``) unless ``--plain-http``. A bad
config exits 2 with each field's path.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from edge_agent.common import cli
from edge_agent.common import settings as common_settings
from edge_agent.common.logs import configure_logging
from hub import config
from hub.errors import HubError


def register(sub: Any) -> None:
    """Add the ``serve`` verb."""
    p = cli.add_verb(
        sub, "serve", run,
        help="run the hub (REST API, model registry)",
        description="Run the hub until SIGTERM/SIGINT. Flags override the config file and "
        "EDGE_HUB_* environment variables.",
    )
    p.add_argument("--config", type=Path, metavar="FILE", help="YAML config file")
    p.add_argument("--host", help="listen address (api.host)")
    p.add_argument("--port", type=int, help="listen port (api.port)")
    p.add_argument("--data-dir", type=Path, metavar="DIR", help="storage.data_dir")
    p.add_argument("--token-file", type=Path, metavar="FILE",
                   help="file holding an admin API token (api.token_file); more tokens, "
                   "with scopes, go in api.tokens")
    tls = p.add_argument_group("TLS (HTTPS is the default)")
    tls.add_argument("--tls-cert-file", type=Path, metavar="PEM",
                     help="the hub's server certificate (api.tls_cert_file)")
    tls.add_argument("--tls-key-file", type=Path, metavar="PEM",
                     help="its private key, mode 0600 (api.tls_key_file)")
    tls.add_argument("--client-ca-file", type=Path, metavar="PEM",
                     help="the fleet CA: agents' client certificates may download models "
                     "(api.client_ca_file)")
    tls.add_argument("--plain-http", action="store_true", default=None,
                     help="serve plain HTTP (api.plain_http; only behind a TLS proxy)")


def settings_from_args(args: argparse.Namespace) -> config.HubSettings:
    """Config file + env, then the command-line overrides (ConfigError names the field)."""
    settings = config.load_settings(args.config)
    api = {k: v for k, v in (("host", args.host), ("port", args.port),
                             ("token_file", args.token_file),
                             ("tls_cert_file", args.tls_cert_file),
                             ("tls_key_file", args.tls_key_file),
                             ("client_ca_file", args.client_ca_file),
                             ("plain_http", args.plain_http)) if v is not None}
    if api:
        settings.api = common_settings.override(settings.api, "api", api, config.ConfigError)
    if args.data_dir is not None:
        settings.storage = common_settings.override(
            settings.storage, "storage", {"data_dir": args.data_dir}, config.ConfigError)
    return settings


def run(args: argparse.Namespace) -> int:
    """Serve until stopped; exit 0 on a clean shutdown."""
    settings = settings_from_args(args)
    check_data_dir(settings.storage.data_dir)
    configure_logging(settings.log.level, settings.log.json_lines)
    from hub.server.app import serve  # noqa: PLC0415 - aiohttp and the registry load for this verb only

    try:
        asyncio.run(serve(settings))
    except OSError as exc:
        if exc.filename:  # a file or folder, not the socket
            raise HubError(f"cannot use {exc.filename}: {exc.strerror or exc}") from exc
        raise HubError(
            f"cannot listen on {settings.api.host}:{settings.api.port}: {exc.strerror or exc}"
        ) from exc
    return 0


def check_data_dir(data_dir: Path) -> None:
    """``storage.data_dir`` must be (or become) a folder this process can write: a config
    error (exit 2, the field named) before anything starts, not a failure half-way up."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        probe = data_dir / ".edge-hub-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise config.ConfigError([("storage.data_dir", f"cannot use it: {exc.strerror or exc}",
                                   str(data_dir))]) from exc
