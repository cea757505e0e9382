"""``edge-hub results tail``: watch the agents' results, de-duplicated, gaps and resets reported.

For the people downstream of the agents (dashboards, PLC bridges, data lakes): a quick look at
what a node or camera produces, a JSON-lines capture to a file, or, with ``--group``, one of
several consumers sharing the load. The work is done by :mod:`hub.client.results`; this module is
the
command line around it. Broker settings come from the hub's config (``--config``, ``EDGE_HUB_*``)
and can be overridden by flags.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar

import orjson
import structlog

from edge_agent.common import cli
from edge_agent.common.logs import configure_logging
from hub.client.results import Gap, Received, Reset, ResultSubscriber
from hub.client.stream import SeqSubscriber
from hub.config import load_settings


class _Delivered(Protocol):
    @property
    def payload(self) -> bytes:
        """The payload as the agent sent it."""
        ...


T = TypeVar("T", bound=_Delivered)


def register(sub: Any) -> None:
    """Add the ``results`` verb group."""
    acts = cli.add_group(sub, "results", help="subscribe to the agents' results",
                         description="Subscribe to the results the agents publish.")
    t = cli.add_verb(
        acts, "tail", run,
        help="print results as they arrive (de-duplicated, gaps and resets reported)",
        description="Subscribe to results, drop duplicates by (node, camera, seq), report gaps "
        "(lost results) and resets (an agent's outbox was replaced and its seqs started a new "
        "series: not a loss) apart on stderr, and print each result (a line per result, or "
        "JSON lines with --json or "
        "--output). Ends after --count results or --timeout seconds, or on Ctrl-C, with a "
        "summary on stderr. Exit 1 when --count results did not arrive within --timeout, "
        "3 when the broker is unreachable or refuses the login or the subscription.",
    )
    add_broker_options(t)
    t.add_argument("--node", help="only this node's results")
    t.add_argument("--camera", help="only this camera's results")
    t.add_argument(
        "--group", help="shared subscription group: consumers in one group split the results"
    )
    t.add_argument("--json", action="store_true", help="print each result as a JSON line")
    t.add_argument(
        "--output", type=Path, help="append results as JSON lines to this file (not stdout)"
    )
    t.add_argument("--count", type=int, help="stop after this many results")
    t.add_argument("--timeout", type=float, help="stop after this many seconds")


def add_broker_options(t: argparse.ArgumentParser) -> None:
    """The broker flags of a tail verb (``results tail``, ``events tail``)."""
    t.add_argument("--config", type=Path, help="hub config file (its mqtt section is used)")
    t.add_argument("--host", help="broker host (default: mqtt.host of the config)")
    t.add_argument("--port", type=int, help="broker port (default: mqtt.port of the config)")
    t.add_argument("--prefix", help="topic prefix (default: mqtt.topic_prefix, 'edge')")
    t.add_argument("--username", help="broker user (default: mqtt.username)")
    t.add_argument("--password-file", type=Path, help="file holding the broker password")
    t.add_argument("--tls", action=argparse.BooleanOptionalAction, default=None,
                   help="TLS to the broker (default: mqtt.tls of the config, on)")
    t.add_argument("--ca-file", type=Path,
                   help="CA bundle that verifies the broker (default: mqtt.ca_file)")
    t.add_argument("--cert-file", type=Path,
                   help="this consumer's certificate, its identity on the broker "
                   "(default: mqtt.cert_file)")
    t.add_argument("--key-file", type=Path,
                   help="the certificate's private key (default: mqtt.key_file)")
    t.add_argument(
        "--mqtt-protocol", type=int, choices=(5, 3), default=None,
        help="MQTT 5 or 3.1.1 (default: mqtt.protocol of the config, 5)",
    )


def _err(line: str) -> None:
    """A line for the person at the terminal (stdout is for results)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _line(r: Received) -> str:
    m = r.message
    if m.detections is not None:
        what = f"detections={len(m.detections)}"
        if m.detections:
            best = max(m.detections, key=lambda d: d.score)
            what += f" top={best.label}:{best.score:.2f}"
    elif m.classes:
        top = m.classes[0]
        what = f"class={top.label}:{top.score:.2f}"
    else:
        what = "no output"
    late = " (late)" if r.late else " (new series)" if r.reset else ""
    return (
        f"{m.node}/{m.camera} seq={m.seq}{late} model={m.model.name}@{m.model.version} "
        f"{what} e2e={m.latency_ms.end_to_end:.1f}ms"
    )


def broker_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Load the hub config, set up logging for a tail verb, and return the subscriber's broker
    keyword arguments: the flags of ``add_broker_options`` over the config's mqtt section."""
    settings = load_settings(args.config)
    level = settings.log.level
    if sys.stderr.isatty() and level.lower() == "info":
        # a person reads this terminal: the command's own lines say what the info logs would
        # (subscribed, gaps, resets, summary); only warnings and errors still interleave
        level = "warning"
    configure_logging(level, settings.log.json_lines)
    # stdout carries the results (JSON lines with --json): log lines go to stderr instead
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))
    mq = settings.mqtt
    return {
        "host": args.host or mq.host, "port": args.port or mq.port,
        "topic_prefix": args.prefix or mq.topic_prefix,
        "username": args.username or mq.username,
        "password_file": args.password_file or mq.password_file,
        "tls": mq.tls if args.tls is None else args.tls,
        "ca_file": args.ca_file or mq.ca_file, "cert_file": args.cert_file or mq.cert_file,
        "key_file": args.key_file or mq.key_file,
        "protocol": args.mqtt_protocol or mq.protocol, "keepalive_s": mq.keepalive_s,
    }


def print_gap(gap: Gap) -> None:
    """A tail verb's ``on_gap``: one line on stderr."""
    _err(f"gap: {gap.node}/{gap.camera} seq {gap.first}..{gap.last} ({gap.count} missing)")


def print_reset(r: Reset) -> None:
    """A tail verb's ``on_reset``: one line on stderr."""
    after = f" after seq {r.previous}" if r.previous >= 0 else ""
    _err(f"reset: {r.node}/{r.camera} seq series restarted at {r.first}{after} "
         f"({r.reason}; not a loss)")


def run(args: argparse.Namespace) -> int:
    """Tail results until --count, --timeout or Ctrl-C; print a summary on stderr."""
    sub = ResultSubscriber(
        **broker_kwargs(args), node=args.node, camera=args.camera, group=args.group,
        on_gap=print_gap, on_reset=print_reset,
    )
    return tail(sub, args, _line, "results")


def tail(sub: SeqSubscriber[T], args: argparse.Namespace, line: Callable[[T], str],
         what: str, each: Callable[[T], None] | None = None) -> int:
    """Start ``sub``, print what it delivers (``line`` per item, or the payload as a JSON line
    with --json/--output) until --count, --timeout or Ctrl-C; the summary on stderr.
    ``each`` is called with every delivered item first (e.g. to save a snapshot's JPEG)."""
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    delivered = 0
    with contextlib.ExitStack() as stack:
        out: IO[bytes] = (
            stack.enter_context(args.output.open("ab")) if args.output else sys.stdout.buffer
        )
        as_json = args.json or args.output is not None
        # waiting for the broker counts against --timeout too
        sub.start(timeout=10.0 if args.timeout is None else max(0.1, min(10.0, args.timeout)))
        stack.callback(sub.close)
        _err(f"subscribed: {' '.join(sub.filters)}")
        try:
            while args.count is None or delivered < args.count:
                wait = 1.0 if deadline is None else deadline - time.monotonic()
                if wait <= 0:
                    break
                r = sub.get(timeout=min(wait, 1.0))
                if r is None:
                    continue
                delivered += 1
                if each is not None:
                    each(r)
                if as_json:
                    # the payload exactly as the agent sent it (fields newer than ours included)
                    out.write(orjson.dumps(orjson.loads(r.payload)) + b"\n")
                else:
                    out.write(line(r).encode() + b"\n")
                out.flush()
        except KeyboardInterrupt:
            pass
    _err("summary: " + orjson.dumps(sub.stats.as_dict()).decode())
    if args.count is not None and delivered < args.count and deadline is not None:
        _err(f"edge-hub: error: {delivered} of {args.count} {what} within {args.timeout:g} s")
        return 1
    return 0
