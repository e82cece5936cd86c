#!/usr/bin/env bash
# Create .venv with the CPU build of torch (pinned in constraints/cpu.txt) and the engine; prepare real CIFAR-10
# into ./data when the shared copy is beside the checkout. Idempotent: a second run takes seconds.
# Needs Python >= 3.10 with its venv module (Debian/Ubuntu: python3-venv); PYTHON picks the interpreter (default
# python3 on PATH), read only when .venv is made.
set -euo pipefail
# ARAT_DATA_DIR given relative to the caller's folder, as arat itself reads it (the script works from the checkout)
if [ -n "${ARAT_DATA_DIR:-}" ]; then export ARAT_DATA_DIR=${ARAT_DATA_DIR/#\~/$HOME}; fi # a quoted "~/data" too
if [ -n "${ARAT_DATA_DIR:-}" ] && [[ $ARAT_DATA_DIR != /* ]]; then export ARAT_DATA_DIR=$PWD/$ARAT_DATA_DIR; fi
cd "$(dirname "$0")/.."
source scripts/setup_lock.sh
take_setup_lock setup # one setup at a time (scripts/setup_lock.sh)
here=$(pwd -P) # the real folder: reached through a symlink or not, one checkout
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ] && ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
    echo "setup: .venv has no working pip (a venv creation cut short?): making it again" >&2
    rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then # each way this fails on a fresh machine, in one line saying what to do
    command -v "$PY" >/dev/null || {
        echo "setup: no $PY on PATH: install Python 3.10 or newer, or set PYTHON=/path/to/python3" >&2
        exit 2
    }
    "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null || {
        echo "setup: $PY is Python $("$PY" -c 'import platform; print(platform.python_version())' 2>/dev/null ||
            echo '(unknown)'); the engine needs 3.10 or newer: set PYTHON=/path/to/python3.10+" >&2
        exit 2
    }
    if ! said=$("$PY" -m venv .venv 2>&1); then
        rm -rf .venv # a half-made venv (no pip) is made again next time anyway
        echo "setup: $PY could not make .venv ($(echo "$said" | grep -m1 -iE 'ensurepip|error|no module' ||
            echo "$said" | tail -n 1)); on Debian/Ubuntu: apt install python3-venv (or python3.X-venv), then rerun" >&2
        exit 2
    fi
fi
stamp=.venv/.arat-installed
pinned=$(sed -n 's/^torch==\([^[:space:]#]*\).*/\1/p' constraints/cpu.txt)
installed=$(.venv/bin/python -c "from importlib.metadata import version; print(version('torch'))" 2>/dev/null || true)
constraints=(-c constraints/cpu.txt)
if [ "$(uname -s)" = Darwin ]; then
    # macOS: torch's wheels there carry no +cpu label (PyPI's plain torch is the CPU/MPS build; no CUDA build to
    # avoid) and triton has none (pyproject.toml installs it on Linux only; the engine runs without it, the kernel
    # tests skip): the same pin without its label
    pinned=${pinned%+cpu}
    mkdir -p .venv
    sed 's/^\(torch==[^+[:space:]#]*\)+cpu/\1/' constraints/cpu.txt > .venv/constraints-macos.txt
    constraints=(-c .venv/constraints-macos.txt)
fi
if [ "${ARAT_KEEP_TORCH:-0}" = 1 ] && [ -n "$installed" ]; then # a venv with a CUDA build its user chose
    echo "setup: ARAT_KEEP_TORCH=1: keeping .venv's torch $installed (the CPU pin $pinned is not installed)" >&2
    constraints=()
elif [ "$installed" != "$pinned" ]; then # none yet, removed since, a venv made by hand, or a CUDA build pip fetched
    [ -z "$installed" ] || echo "setup: .venv has torch $installed, the pin is $pinned (constraints/cpu.txt):" \
        "installing the pin (ARAT_KEEP_TORCH=1 keeps it)" >&2
    rm -f "$stamp"
fi
# The stamp holds the checkout's folder: a .venv copied or moved with its checkout still runs the other folder's
# engine (an editable install) through scripts naming the other folder's python, until it is installed again here
if [ -f "$stamp" ] && other=$(cat "$stamp") && [ "$other" != "$here" ]; then
    echo "setup: .venv was installed for ${other:-a folder it did not record}: installing this checkout's engine" >&2
    rm -f "$stamp"
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints/cpu.txt -nt "$stamp" ]; then
    what="torch $pinned, the engine"
    [ ${#constraints[@]} -gt 0 ] || what="the engine (torch kept)"
    echo "setup: installing $what and its test tools into .venv (first time: a few minutes)" >&2
    .venv/bin/python -m pip install -q --upgrade pip
    # ARAT_TORCH_INDEX: where pip finds the pinned CPU build when it is not on this machine's disk
    # (https://download.pytorch.org/whl/cpu; PyPI has no +cpu builds, and its plain torch is the CUDA one)
    .venv/bin/python -m pip install -q ${constraints[@]+"${constraints[@]}"} \
        ${ARAT_TORCH_INDEX:+--extra-index-url "$ARAT_TORCH_INDEX"} -e ".[test]" || {
        if [ "$(uname -s)" = Darwin ]; then
            echo "setup: pip could not install torch $pinned with the engine (above); macOS needs Python 3.10+ on" \
                "an arm64 Mac (Intel Macs have no torch wheels since 2.3)" >&2
        else
            echo "setup: pip could not install the pinned torch $pinned with the engine; if pip found no $pinned," \
                "set ARAT_TORCH_INDEX=https://download.pytorch.org/whl/cpu and rerun" >&2
        fi
        exit 1
    }
    echo "$here" > "$stamp"
fi
data=${ARAT_DATA_DIR:-data}
prepare=../shared/data/cifar10/prepare.py
# batches.meta is the last file prepare.py writes: a preparation cut short is redone
if [ ! -f "$data/cifar-10-batches-py/batches.meta" ] && [ -f "$prepare" ]; then
    echo "preparing real CIFAR-10 (JPEG-degraded copy) into $data"
    # into a folder of its own, renamed into place once whole: a run started meanwhile (another checkout's, on a
    # shared data folder) reads the whole dataset or none (in place it read half-written files as corrupt)
    # (a staging folder of an hour ago is one a setup stopped outright left: ~180 MB)
    staging=
    find "$data" -maxdepth 1 -name '.prepare-*' -mmin +60 -exec rm -rf {} + 2>/dev/null || true
    mkdir -p "$data" && staging=$(mktemp -d "$data/.prepare-XXXXXX") && .venv/bin/python "$prepare" "$staging" &&
        .venv/bin/python - "$staging/cifar-10-batches-py" "$data/cifar-10-batches-py" <<'PY' &&
import os, shutil, sys
staging, final = sys.argv[1:]
if os.path.isdir(final) and not os.path.isfile(os.path.join(final, "batches.meta")):
    shutil.rmtree(final)  # one cut short (an older setup prepared in place)
try:
    os.rename(staging, final)
except OSError:  # another setup's, renamed there first
    sys.exit(not os.path.isfile(os.path.join(final, "batches.meta")))
PY
        echo "setup: CIFAR-10 renamed into place: $data/cifar-10-batches-py" ||
        echo "setup: could not prepare CIFAR-10 into $data (above): until it is, the demo trains on synthetic data" \
            "and the real-data tests skip; rerun this script to try again" >&2
    [ -z "${staging:-}" ] || rm -rf "$staging"
fi
