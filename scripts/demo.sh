#!/usr/bin/env bash
# The README's main-job command. For now: classify a bundled sample image with a real model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/edge-agent infer --model models/out/efficientnet-lite0/manifest.json models/out/samples/chelsea.png
