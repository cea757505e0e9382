"""write or check the JSON Schemas of the MQTT payloads (results, events, zones, ...)

One JSON Schema (draft 2020-12) per payload of the wire contract, made from the models the
agent and the hub decode with: result, telemetry, state, desired, event, zone, snapshot. For
subscribers in other languages, or to validate payloads in a pipeline. The repository keeps a
copy in docs/schemas/. With --out DIR, writes them there; with --check DIR, exits 1 naming
each file that is missing or out of date (0 when all match); with neither, prints the one
named by --payload (default: every one, as one JSON object keyed by payload).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edge_agent.contract import schemas


def arguments(parser: argparse.ArgumentParser) -> None:
    """Where to write, what to check, or which one to print."""
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--out", type=Path, metavar="DIR",
                      help="write {payload}.schema.json files into DIR")
    what.add_argument("--check", type=Path, metavar="DIR",
                      help="exit 1 when DIR's schema files are missing or out of date")
    what.add_argument("--payload", choices=[p.name for p in schemas.PAYLOADS],
                      help="print only this payload's schema")


def run(args: argparse.Namespace) -> int:
    """0 on success; 1 for stale files with --check."""
    if args.out:
        for path in schemas.write(args.out):
            print(f"wrote {path}")
        return 0
    if args.check:
        bad = schemas.stale(args.check)
        for name in bad:
            print(f"out of date or missing: {args.check / name}")
        if bad:
            print(f"run: edge-agent schemas --out {args.check}")
            return 1
        print(f"ok: {len(schemas.PAYLOADS)} schemas in {args.check} match the contract")
        return 0
    chosen = [p for p in schemas.PAYLOADS if args.payload in (None, p.name)]
    if args.payload:
        print(schemas.render(chosen[0]), end="")
    else:
        print(json.dumps({p.name: schemas.schema(p) for p in chosen}, indent=2,
                         sort_keys=True))
    return 0
