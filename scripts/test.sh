#!/usr/bin/env bash
# The README's test command: set up (idempotent) and run the whole suite, slow fault tests too.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m 'not slow' -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest "$@"
