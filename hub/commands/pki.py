"""``edge-hub pki``: create the hub's CA and issue certificates from it.

Every party on the site gets its own certificate from one CA (docs/security.md): each node (role
``agent``, common name = the node name, which the broker uses as the user name), each result
consumer or dashboard (``consumer``), the hub's MQTT client (``hub``), and the broker and the
hub's HTTPS (``server``, with the DNS names and addresses clients dial). On K3s the agents get
theirs by themselves (``POST /v1/pki/bootstrap``); ``issue`` is for static sites, the demo and
every other party.

The CA's folder is ``--dir``, else ``pki.dir`` from the hub's config, else
``<storage.data_dir>/pki``. Keys are written with mode 0600; nothing is overwritten without
``--force``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from edge_agent.common import cli
from edge_agent.contract import protocol
from hub import config
from hub.client import output
from hub.errors import InvalidRequest
from hub.pki import ca


def register(sub: Any) -> None:
    """Add ``pki`` and its actions."""
    acts = cli.add_group(
        sub, "pki", help="create the CA and issue certificates (agents, consumers, servers)",
        description="The hub's certificate authority. The CA folder is --dir, else pki.dir "
        "from --config, else <storage.data_dir>/pki.")
    init = cli.add_verb(acts, "init", _init, help="create a new CA (refuses to replace one)")
    _common(init)
    init.add_argument("--name", default="edge-hub CA", help="the CA's common name")
    init.add_argument("--days", type=int, default=3650,
                      help="the CA's life in days (default 3650; rotate before it ends)")

    issue = cli.add_verb(acts, "issue", _issue, help="issue a key and certificate for a party")
    _common(issue)
    issue.add_argument("name", metavar="NAME",
                       help="who: the node name for --role agent, else any name (max 64)")
    issue.add_argument("--role", required=True, choices=ca.ROLES,
                       help="agent (a node), consumer (reads results), hub (the hub's MQTT "
                       "client), server (broker or hub HTTPS: give --dns/--ip)")
    issue.add_argument("--dns", action="append", default=[], metavar="NAME",
                       help="a DNS name the server answers to (repeatable)")
    issue.add_argument("--ip", action="append", default=[], metavar="ADDR",
                       help="an IP address the server answers on (repeatable)")
    issue.add_argument("--days", type=float, default=365,
                       help="life in days (default 365)")
    issue.add_argument("--out", type=Path, required=True, metavar="DIR",
                       help="where to write tls.crt, tls.key (0600) and ca.crt")
    issue.add_argument("--force", action="store_true", help="overwrite existing files")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", type=Path, metavar="DIR", help="the CA's folder")
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="the hub's YAML config (for pki.dir / storage.data_dir)")


def _ca_dir(args: argparse.Namespace) -> Path:
    if args.dir is not None:
        return Path(args.dir)
    return config.load_settings(args.config).pki_dir()


def _init(args: argparse.Namespace) -> int:
    """Create a CA: ca.crt (give it to every party) and ca.key (mode 0600; it signs every
    identity of the fleet, keep it on the hub only)."""
    folder = _ca_dir(args)
    if not 0 < args.days <= 36500:
        raise InvalidRequest(f"--days must be in [1, 36500], got {args.days}")
    authority = ca.CertificateAuthority.init(folder, name=args.name, days=args.days)
    output.say(f"CA certificate: {folder / ca.CA_CERT} (valid until "
               f"{authority.cert.not_valid_after_utc:%Y-%m-%d})")
    output.say(f"CA key:         {folder / ca.CA_KEY} (keep it secret)")
    return 0


def _issue(args: argparse.Namespace) -> int:
    """Issue a new key and certificate for NAME in ROLE, written to --out as tls.crt, tls.key
    (mode 0600) and ca.crt."""
    if args.role == "agent" and not protocol.is_valid_node(args.name):
        raise InvalidRequest(f"{args.name!r} is not a node name (lowercase letters, digits, "
                             "'-' and '.')")
    if args.role != "server" and (args.dns or args.ip):
        raise InvalidRequest("--dns and --ip are for --role server")
    if args.role == "server" and not (args.dns or args.ip):
        raise InvalidRequest("a server certificate needs at least one --dns or --ip (the "
                             "names clients dial; they verify it against these)")
    out: Path = args.out
    if not args.force:
        taken = [str(out / f) for f in (ca.OUT_CERT, ca.OUT_KEY, ca.OUT_CA) if (out / f).exists()]
        if taken:  # checked before signing, so a refusal issues nothing
            raise InvalidRequest(f"{', '.join(taken)} exists; pass --force to overwrite")
    authority = ca.CertificateAuthority.load(_ca_dir(args))
    issued = authority.issue(args.name, args.role, days=args.days, dns_names=tuple(args.dns),
                             ip_addresses=tuple(args.ip))
    paths = ca.save(out, issued, authority.cert_pem, overwrite=True)
    output.say(f"issued {args.role} {args.name!r}: serial {issued.serial:x}, valid until "
               f"{issued.not_after:%Y-%m-%d %H:%M} UTC")
    for p in paths:
        output.say(f"  {p}")
    return 0
