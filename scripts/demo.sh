#!/usr/bin/env bash
# The README's main-job command: set up (idempotent), then the local demo (demo/run.py): a broker,
# the hub with three static nodes and three agents on this machine, two model versions pushed and
# the second rolled out canary -> all with health gates. Arguments go to demo/run.py, e.g.
# `bash scripts/demo.sh --exit-after-summary` or `--json`; see docs/demo.md.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${EDGE_DEMO_SKIP_SETUP:-}" != "1" ]; then
  # setup's own progress goes to stderr so that `--json` leaves stdout to the summary alone
  bash scripts/setup.sh >&2
fi
# exec: Ctrl-C and SIGTERM reach the demo itself, which stops its children and exits 130
exec .venv/bin/python demo/run.py "$@"
