#!/usr/bin/env bash
# Set up (venv, real CIFAR-10, optional data backends, native CPU kernels), then run the whole test suite on CPU.
# pytest arguments pass through, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
# ARAT_DATA_DIR given relative to the caller's folder, as arat itself reads it (the script works from the checkout)
if [ -n "${ARAT_DATA_DIR:-}" ]; then export ARAT_DATA_DIR=${ARAT_DATA_DIR/#\~/$HOME}; fi # a quoted "~/data" too
if [ -n "${ARAT_DATA_DIR:-}" ] && [[ $ARAT_DATA_DIR != /* ]]; then export ARAT_DATA_DIR=$PWD/$ARAT_DATA_DIR; fi
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The data backends' pip installs and the native build write .venv and build/ as setup does: under its lock too (two
# test runs, or the tests beside a demo's setup, in one checkout), released before the tests
source scripts/setup_lock.sh
take_setup_lock test
# PYTHON names the base interpreter for setup.sh; the child scripts take the project's (.venv)
backends=0
PYTHON=.venv/bin/python bash scripts/install_data_backends.sh all || backends=$?
if [ "$backends" = 3 ]; then # only root was missing (ffcv's system libraries): its tests skip, say so
    echo "test: ffcv not installed (its system libraries need root): its tests will skip" >&2
elif [ "$backends" = 4 ]; then # no apt-get (macOS, another Linux): the same
    echo "test: ffcv not installed (its system libraries: no apt-get here, above): its tests will skip" >&2
elif [ "$backends" != 0 ]; then # optional too (a mirror, a wheel or a build failing): the tests run, theirs skip
    echo "test: WARNING: the data backends did not install (exit $backends, above): the FFCV/DALI tests will skip" >&2
fi
if command -v cmake >/dev/null && command -v c++ >/dev/null; then
    echo "test: building the native CPU kernels (build/; first time ~1 min)" >&2
    PYTHON=.venv/bin/python bash scripts/build_native.sh || echo "test: WARNING: the native CPU kernels did not" \
        "build (above): their tests will skip" >&2
else # optional: the suite runs without it (the native backend's tests skip), say so
    echo "test: cmake or a C++ compiler not found: the native CPU kernels are not built and their tests skip" \
        "(apt-get install -y cmake g++)" >&2
fi
exec 9<&-
export ARAT_TEST_DATA=${ARAT_TEST_DATA:-${ARAT_DATA_DIR:-data}}
# One pytest-xdist worker per core (at most 4), torch at one thread in each (tests/conftest.py): much of the suite is
# compiling (Inductor's C++, Triton's ahead-of-time builds) and starting processes, which a worker per core overlaps
# (on two cores 7-16 min by CPU model, against 14-21 min in one process). ARAT_TEST_WORKERS=0 runs it in one process.
workers=${ARAT_TEST_WORKERS:-$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)}
[[ "$workers" =~ ^[0-9]+$ ]] || { echo "ARAT_TEST_WORKERS=$workers: give a number of workers (0: one process)" >&2; exit 2; }
[ "$workers" -le 4 ] || workers=4
[ "$workers" -ge 2 ] || workers=0
exec .venv/bin/python -m pytest -q -n "$workers" "$@"
