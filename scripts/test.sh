#!/usr/bin/env bash
# Set up (venv, real CIFAR-10, optional data backends, native CPU kernels), then run the whole test suite on CPU.
# pytest arguments pass through, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/install_data_backends.sh all
bash scripts/build_native.sh
export ARAT_TEST_DATA=${ARAT_TEST_DATA:-${ARAT_DATA_DIR:-data}}
exec .venv/bin/python -m pytest -q "$@"
