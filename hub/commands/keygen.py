"""``edge-hub keygen``: make an ed25519 key pair for signing model versions.

The private key (``PREFIX.key``, mode 0600) stays with the release engineer and signs pushes
(``models push --sign``); the public key (``PREFIX.pub``) goes to the hub
(``signing.public_key_files``) and to the agents that should refuse unsigned models.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from edge_agent.common import cli
from hub.client.output import say
from hub.errors import InvalidRequest
from hub.registry.signing import generate_keypair


def register(sub: Any) -> None:
    """Add the ``keygen`` verb."""
    p = cli.add_verb(sub, "keygen", run,
                     help="create an ed25519 key pair for signing model versions",
                     description="Write PREFIX.key (private, mode 0600) and PREFIX.pub "
                     "(public), PEM.")
    p.add_argument("prefix", type=Path, metavar="PREFIX", help="e.g. keys/release")
    p.add_argument("--force", action="store_true", help="overwrite existing files")


def run(args: argparse.Namespace) -> int:
    """Write the key pair; refuse to overwrite without --force."""
    prefix: Path = args.prefix
    private_path = prefix.parent / (prefix.name + ".key")
    public_path = prefix.parent / (prefix.name + ".pub")
    if not args.force:
        for p in (private_path, public_path):
            if p.exists():
                raise InvalidRequest(f"{p} exists; pass --force to overwrite")
    private, public = generate_keypair()
    prefix.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(private_path, flags, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    os.chmod(private_path, 0o600)
    public_path.write_bytes(public)
    say(f"private key: {private_path} (keep it secret)")
    say(f"public key:  {public_path}")
    return 0
