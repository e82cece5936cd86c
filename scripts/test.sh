#!/usr/bin/env bash
# Set up, then run the whole test suite on CPU (pytest arguments pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export ARAT_TEST_DATA=${ARAT_TEST_DATA:-${ARAT_DATA_DIR:-data}}
exec .venv/bin/python -m pytest -q "$@"
