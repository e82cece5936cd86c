#!/usr/bin/env bash
# Set up, then train + evaluate the `demo` recipe (AR-AT, ~10 min on a 2-core CPU; real CIFAR-10 when present) in
# runs/demo. Run again after an interruption, it continues that run from its last finished epoch; after a finished
# one (or with arguments, which only a new run takes), it starts a new run in runs/demo-<date>.
set -euo pipefail
# ARAT_DATA_DIR given relative to the caller's folder, as arat itself reads it (the script works from the checkout)
if [ -n "${ARAT_DATA_DIR:-}" ]; then export ARAT_DATA_DIR=${ARAT_DATA_DIR/#\~/$HOME}; fi # a quoted "~/data" too
if [ -n "${ARAT_DATA_DIR:-}" ] && [[ $ARAT_DATA_DIR != /* ]]; then export ARAT_DATA_DIR=$PWD/$ARAT_DATA_DIR; fi
cd "$(dirname "$0")/.."
bash scripts/setup.sh
run=runs/demo
if [ $# -eq 0 ] && [ -f "$run/config.json" ] && [ ! -f "$run/results.json" ]; then
    echo "demo: continuing the interrupted run in $run"
    args=(--resume "$run")
else
    [ ! -e "$run" ] || run="runs/demo-$(date +%Y%m%d-%H%M%S)"
    args=(--recipe demo --out "$run" "$@")
fi
# What arat says when interrupted (Ctrl-C, SIGTERM): the demo's own command where it continues this run, else
# the venv's arat (not on the demo user's PATH). exec: signals reach arat itself, which saves and exits 128 + the
# signal (130 after Ctrl-C, 143 after SIGTERM; also SIGHUP and SIGUSR1).
if [ "$run" = runs/demo ]; then
    export ARAT_CONTINUE_HINT="\`bash scripts/demo.sh\` again (without arguments)"
else
    export ARAT_CONTINUE_HINT="\`.venv/bin/arat train --resume $run\`"
fi
exec .venv/bin/arat train "${args[@]}"
