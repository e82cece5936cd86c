#!/usr/bin/env bash
# Install the optional data backends into the project's python: bash scripts/install_data_backends.sh [ffcv|dali|all]
#
#   ffcv  system libraries (apt: libopencv-dev libturbojpeg0-dev pkg-config g++), then ffcv==1.0.2 built from source
#         with --no-deps: its declared deps pull opencv-python (the GUI build) and pytorch-pfn-extras (torch); we
#         install what it really imports instead (numba, opencv-python-headless, pillow, ...).
#   dali  nvidia-dali-cuda130 (its wheel runs on the CPU too, with device_id=None).
#
# Idempotent: a backend that already imports is left alone (a rerun takes seconds). Pip runs with the CPU torch
# constraints, so nothing here replaces torch. PYTHON picks the interpreter (default .venv/bin/python).
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
CONSTRAINTS="constraints/cpu.txt"
FFCV_DEPS=(numba opencv-python-headless "pillow>=9" terminaltables fastargs assertpy psutil tqdm)
WHAT="${1:-all}"

pip_install() {
    "$PYTHON" -m pip install --quiet --disable-pip-version-check -c "$CONSTRAINTS" "$@"
}

imports() {
    "$PYTHON" -c "import $1" >/dev/null 2>&1
}

NO_ROOT=3 # the exit status when only root (apt-get) was missing: scripts/test.sh goes on, those backends' tests skip
NO_APT=4  # ffcv's system libraries missing on a system without apt-get (macOS, Fedora, Amazon Linux): the same

can_sudo() { # without a password, or (at a terminal) after asking for it once
    command -v sudo >/dev/null || return 1
    sudo -n true 2>/dev/null && return
    [ -t 0 ] && sudo -v
}

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif can_sudo; then sudo "$@"; else
        echo "need root for: $* (run this script as root, or install the packages yourself)" >&2
        return "$NO_ROOT"
    fi
}

ffcv_system_libs() {
    if command -v pkg-config >/dev/null && command -v g++ >/dev/null &&
        pkg-config --exists libturbojpeg && { pkg-config --exists opencv4 || pkg-config --exists opencv; }; then
        return
    fi
    if ! command -v apt-get >/dev/null; then # (asked before sudo: no password prompt for a command that is not there)
        echo "ffcv: no apt-get here: install libjpeg-turbo, OpenCV 4, pkg-config and g++ with this system's" \
            "package manager, then rerun" >&2
        return "$NO_APT"
    fi
    echo "ffcv: installing system libraries (apt-get; on a bare machine ~250 packages, a few minutes)"
    as_root apt-get update -qq || return
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopencv-dev libturbojpeg0-dev pkg-config g++ \
        >/dev/null
}

install_ffcv() {
    if imports ffcv.loader; then
        echo "ffcv: already installed"
        return
    fi
    ffcv_system_libs || return
    echo "ffcv: installing ffcv==1.0.2 and its runtime dependencies"
    pip_install "${FFCV_DEPS[@]}" || return # each step `|| return`: under `install_ffcv || ...` set -e is off
    pip_install --no-deps "ffcv==1.0.2" || return
    "$PYTHON" -c "import ffcv.loader, ffcv._libffcv" || return
    echo "ffcv: ok"
}

install_dali() {
    if imports nvidia.dali; then
        echo "dali: already installed"
        return
    fi
    echo "dali: installing nvidia-dali-cuda130"
    pip_install nvidia-dali-cuda130
    "$PYTHON" -c "import nvidia.dali" && echo "dali: ok"
}

case "$WHAT" in
ffcv) install_ffcv ;;
dali) install_dali ;;
all)
    # ffcv without root: dali still installs, then the exit status says only root was missing
    ffcv_rc=0
    install_ffcv || ffcv_rc=$?
    [ "$ffcv_rc" = 0 ] || [ "$ffcv_rc" = "$NO_ROOT" ] || [ "$ffcv_rc" = "$NO_APT" ] || exit "$ffcv_rc"
    install_dali
    exit "$ffcv_rc"
    ;;
*)
    echo "usage: $0 [ffcv|dali|all]" >&2
    exit 2
    ;;
esac
