#!/usr/bin/env bash
# The README's test command: set up (idempotent) and run the whole suite, slow fault tests too.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m 'not slow' -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest "$@"
# the whole run (no arguments, as CI calls it) also runs every hub test on PostgreSQL: each test
# hub then keeps its state in a database of its own on one throw-away server
if [ $# -eq 0 ]; then
  echo "test: the hub tests again, on PostgreSQL (EDGE_TEST_DATABASE=postgresql)"
  EDGE_TEST_DATABASE=postgresql .venv/bin/python -m pytest tests/hub
fi
