"""``edge-hub events tail``: watch the agents' track events, de-duplicated, gaps and resets
reported, filtered by node, camera, label and zone; with ``--occupancy``, zone counts too.

The events counterpart of ``edge-hub results tail`` (:mod:`hub.commands.results`, whose broker
flags, logging set-up and tail loop it shares); the work is done by :mod:`hub.client.events`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_agent.common import cli
from edge_agent.contract.snapshots import SnapshotMessage
from hub.client.events import Event, EventSubscriber, Item, Snapshot
from hub.commands import results
from hub.errors import InvalidRequest


def register(sub: Any) -> None:
    """Add the ``events`` verb group."""
    acts = cli.add_group(sub, "events", help="subscribe to the agents' track events",
                         description="Subscribe to the track events and zone occupancy the "
                         "agents publish (docs/events.md).")
    t = cli.add_verb(
        acts, "tail", run,
        help="print track events as they arrive (de-duplicated, gaps and resets reported)",
        description="Subscribe to track events (new, update, end), drop duplicates by (node, "
        "camera, seq), report gaps (lost events) and resets (an agent's outbox was replaced: "
        "not a loss) on stderr, and print each event (a line per event, or JSON lines with "
        "--json or --output). --label and --zone filter on this side, after de-duplication: "
        "an event passes --zone when its object is in that zone or has been. --occupancy adds "
        "the retained per-zone counts; --snapshots DIR the tracks' JPEG snapshots, saved into DIR. "
        "Ends after --count items or --timeout seconds, or on "
        "Ctrl-C, with a summary on stderr. Exit 1 when --count items did not arrive within "
        "--timeout, 3 when the broker is unreachable or refuses the login or the subscription.",
    )
    results.add_broker_options(t)
    t.add_argument("--node", help="only this node's events")
    t.add_argument("--camera", help="only this camera's events")
    t.add_argument("--label", help="only objects with this label (e.g. person)")
    t.add_argument("--zone", help="only objects that are or were in this zone")
    t.add_argument("--occupancy", action="store_true",
                   help="also print each zone's occupancy (retained counts by label)")
    t.add_argument("--snapshots", type=Path, metavar="DIR",
                   help="also take the tracks' snapshots and save each JPEG into DIR (made if "
                        "missing) as NODE_CAMERA_TRACK_AT.jpg")
    t.add_argument(
        "--group", help="shared subscription group: consumers in one group split the events"
    )
    t.add_argument("--json", action="store_true", help="print each event as a JSON line")
    t.add_argument(
        "--output", type=Path, help="append events as JSON lines to this file (not stdout)"
    )
    t.add_argument("--count", type=int, help="stop after this many events (and counts)")
    t.add_argument("--timeout", type=float, help="stop after this many seconds")


def _snapshot_file(shot: SnapshotMessage) -> str:
    # node, camera: names the contract checked (no '/' or '..'); track: an integer
    return f"{shot.node}_{shot.camera}_{shot.track}_{shot.at}.jpg"


def _saver(directory: Path) -> Callable[[Item], None]:
    """Write each snapshot's JPEG into ``directory`` (whole files only: written aside, then
    renamed into place)."""
    def save(item: Item) -> None:
        if isinstance(item, Snapshot):
            path = directory / _snapshot_file(item.message)
            tmp = path.with_name(path.name + ".part")
            tmp.write_bytes(item.message.image_bytes())
            tmp.replace(path)
    return save


def _line(item: Item, directory: Path | None = None) -> str:
    if isinstance(item, Snapshot):
        s = item.message
        late = " (late)" if item.late else " (new series)" if item.reset else ""
        saved = f" saved={directory / _snapshot_file(s)}" if directory is not None else ""
        return (f"{s.node}/{s.camera} seq={s.seq}{late} snapshot({s.at}) track={s.track} "
                f"label={s.label} score={s.score:.2f} {s.width}x{s.height} "
                f"jpeg={len(s.image_bytes())}B zones={','.join(s.zones) or '-'}{saved}")
    if not isinstance(item, Event):
        o = item.message
        labels = " ".join(f"{k}={v}" for k, v in o.labels.items())
        return f"{o.node}/{o.camera} zone={o.zone} count={o.count} {labels}".rstrip()
    m = item.message
    why = f"({m.reason})" if m.reason else ""
    late = " (late)" if item.late else " (new series)" if item.reset else ""
    zones = ",".join(m.in_zones) or "-"
    crossed = "".join(f" crossed={c.line}:{c.direction}" for c in m.crossings[-1:])
    return (f"{m.node}/{m.camera} seq={m.seq}{late} {m.type}{why} track={m.track} "
            f"label={m.label} score={m.score:.2f} best={m.best.score:.2f} zones={zones} "
            f"age={m.last_seen - m.first_seen:.1f}s frames={m.frames}{crossed}")


def run(args: argparse.Namespace) -> int:
    """Tail events until --count, --timeout or Ctrl-C; print a summary on stderr."""
    try:
        sub = EventSubscriber(
            **results.broker_kwargs(args), node=args.node, camera=args.camera,
            label=args.label, zone=args.zone, occupancy=args.occupancy,
            snapshots=args.snapshots is not None, group=args.group,
            on_gap=results.print_gap, on_reset=results.print_reset,
        )
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from exc
    directory = args.snapshots
    if directory is not None:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InvalidRequest(f"--snapshots {directory}: {exc.strerror or exc}") from exc
    return results.tail(sub, args, lambda item: _line(item, directory), "events",
                        each=_saver(directory) if directory is not None else None)
