#!/usr/bin/env bash
# Set up, then train + evaluate the `demo` recipe (AR-AT, ~10 min on a 2-core CPU; real CIFAR-10 when present).
set -euo pipefail
# ARAT_DATA_DIR given relative to the caller's folder, as arat itself reads it (the script works from the checkout)
if [ -n "${ARAT_DATA_DIR:-}" ] && [[ $ARAT_DATA_DIR != /* ]]; then export ARAT_DATA_DIR=$PWD/$ARAT_DATA_DIR; fi
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/arat train --recipe demo --out "runs/demo-$(date +%Y%m%d-%H%M%S)" "$@"
