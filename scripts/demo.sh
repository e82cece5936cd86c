#!/usr/bin/env bash
# Set up, then train + evaluate the `demo` recipe (AR-AT, ~10 min on a 2-core CPU; real CIFAR-10 when present).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/arat train --recipe demo --out "runs/demo-$(date +%Y%m%d-%H%M%S)" "$@"
