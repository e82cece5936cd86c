#!/usr/bin/env bash
# Reproduce the seed's tables: every method's recipe trained and evaluated (clean, PGD-20, AutoAttack on the test
# set, as each recipe sets), then `arat table` renders the markdown table and the clean-vs-AA plot beside the
# published numbers. The recipes are the full-scale ones (100 epochs; ARREST 100 + 20, or 20 fine-tuning the std run):
# a GPU's job, one run after another.
#
#   bash scripts/reproduce.sh [OUT_DIR] [--set KEY=VALUE ...]   (default OUT_DIR: the checkout's runs/reproduce-$ARCH-$DATASET)
#   env: ARCH (resnet18 | wrn34-10), DATASET (cifar10 | cifar100), SEEDS ("0"; "0 1 2" for mean ± std),
#        METHODS ("std at trades mart lbgat arat arrest"; arrest fine-tunes this script's std run when std is listed,
#        else trains its own standard stage), ABLATIONS (0; 1 adds the four ablation rows, CIFAR-10 only, with
#        analysis.grad_sim on), SWA (0; 1 adds AR-AT + SWA, CIFAR-10 only), NPROC (1; N trains and evaluates each
#        run under `torchrun --standalone --nproc_per_node N`), DATA_DIR (default $ARAT_DATA_DIR, else the checkout's data/),
#        ARREST_SET (extra --set arguments for ARREST only), ARAT (the arat command; default .venv/bin/arat, else
#        `arat` on PATH), TORCHRUN (default: the torchrun beside $ARAT)
#   Every --set after OUT_DIR goes to every new run (e.g. --set eval.aa_num_examples=1000 for a shorter evaluation).
#
# Interrupted? Run it again: finished runs are kept, unfinished ones resume from their last epoch (with the
# settings they started with).
set -euo pipefail
from_caller() { # a path given relative to the caller's folder, made absolute (the script works from the checkout)
    if [[ $1 == /* ]]; then echo "$1"; else echo "$PWD/$1"; fi
}
ARCH=${ARCH:-resnet18}
DATASET=${DATASET:-cifar10}
OUT=runs/reproduce-$ARCH-$DATASET # in the checkout
if [ $# -gt 0 ] && [[ $1 != --* ]]; then
    OUT=$(from_caller "$1")
    shift
fi
if [ -n "${DATA_DIR:-${ARAT_DATA_DIR:-}}" ]; then DATA_DIR=$(from_caller "${DATA_DIR:-$ARAT_DATA_DIR}"); fi
# a command given as a relative path (ARAT=../.venv/bin/arat) is the caller's too; a bare name is looked up on PATH
if [[ ${ARAT:-} == */* ]]; then ARAT=$(from_caller "$ARAT"); fi
if [[ ${TORCHRUN:-} == */* ]]; then TORCHRUN=$(from_caller "$TORCHRUN"); fi
cd "$(dirname "$0")/.."
SETS=("$@")
SEEDS=${SEEDS:-0}
METHODS=${METHODS:-std at trades mart lbgat arat arrest}
ABLATIONS=${ABLATIONS:-0}
SWA=${SWA:-0}
NPROC=${NPROC:-1}
DATA_DIR=${DATA_DIR:-data} # default: the checkout's (scripts/setup.sh prepares it there)
read -r -a ARREST_SETS <<<"${ARREST_SET:-}"

die() {
    echo "reproduce: $*" >&2
    exit 2
}
case "$ARCH" in resnet18 | wrn34-10) ;; *) die "ARCH=$ARCH: resnet18 or wrn34-10" ;; esac
case "$DATASET" in cifar10 | cifar100) ;; *) die "DATASET=$DATASET: cifar10 or cifar100" ;; esac
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || die "NPROC=$NPROC: a number of processes (GPUs), 1 or more"
if [ -z "${ARAT:-}" ]; then # the project's venv (scripts/setup.sh), else an installed `arat` (a GPU machine's env)
    if [ -x .venv/bin/arat ]; then ARAT=.venv/bin/arat; else ARAT=$(command -v arat) || ARAT=; fi
    [ -n "$ARAT" ] || die "no arat command: run scripts/setup.sh, or pip install -e . into this python, or set ARAT"
fi
if [[ $ARAT == */* ]]; then TORCHRUN=${TORCHRUN:-$(dirname "$ARAT")/torchrun}; else TORCHRUN=${TORCHRUN:-torchrun}; fi
for ((i = 0; i < ${#SETS[@]}; i += 2)); do # (${#a[@]} of an empty array is 0 on every bash)
    [ "${SETS[i]}" = --set ] && [ $((i + 1)) -lt ${#SETS[@]} ] ||
        die "after OUT_DIR only --set KEY=VALUE pairs are taken (got '${SETS[i]}')"
done
has_std=0
has_arrest=0
for name in $METHODS; do
    case "$name" in std | at | trades | mart | lbgat | arat | arrest) ;; *) die "METHODS: unknown method $name" ;; esac
    [ "$name" = std ] && has_std=1
    [ "$name" = arrest ] && has_arrest=1
done
for seed in $SEEDS; do
    [[ "$seed" =~ ^[0-9]+$ ]] || die "SEEDS: $seed is not a seed (whole numbers, e.g. SEEDS=\"0 1 2\")"
done
[ -n "${SEEDS// /}" ] || die "SEEDS is empty: leave it unset for seed 0, or list seeds (SEEDS=\"0 1 2\")"
for flag in ABLATIONS SWA; do
    case "${!flag}" in 0 | 1) ;; *) die "$flag=${!flag}: 0 or 1" ;; esac
done
if [ "$DATASET" != cifar10 ] && { [ "$ABLATIONS" = 1 ] || [ "$SWA" = 1 ]; }; then
    die "ABLATIONS and SWA have CIFAR-10 recipes only: set DATASET=cifar10 or leave them 0"
fi

arat_train() { # one process, or torchrun with NPROC ranks (evaluation included)
    if [ "$NPROC" = 1 ]; then
        "$ARAT" train "$@"
    else
        "$TORCHRUN" --standalone --nproc_per_node "$NPROC" -m engine.cli train "$@"
    fi
}

train() { # train RUN_DIR ARGS...: skip a finished run, resume an interrupted one
    local run=$1
    shift
    if [ -f "$run/results.json" ]; then
        echo "reproduce: $run is done"
    elif [ -f "$run/config.json" ]; then
        echo "reproduce: resuming $run"
        arat_train --resume "$run" --data-dir "$DATA_DIR"
    else
        echo "reproduce: training $run"
        arat_train --out "$run" --data-dir "$DATA_DIR" "$@"
    fi
}

recipes=()
for name in $METHODS; do [ "$name" = arrest ] || recipes+=("$name-$ARCH-$DATASET"); done
[ "$SWA" = 1 ] && recipes+=("arat-swa-$ARCH-cifar10")
if [ "$ABLATIONS" = 1 ]; then
    for v in v0 stopgrad splitbn arat; do recipes+=("ablation-$v-$ARCH-cifar10"); done
fi
# ${a[@]+"${a[@]}"}: an empty array expands to nothing under set -u on every bash (before 4.4 "${a[@]}" fails)
for seed in $SEEDS; do
    for recipe in ${recipes[@]+"${recipes[@]}"}; do
        extra=()
        [[ $recipe == ablation-* ]] && extra=(--set analysis.grad_sim=true)
        train "$OUT/${recipe%-"$ARCH"-*}-s$seed" --recipe "$recipe" ${SETS[@]+"${SETS[@]}"} --set train.seed="$seed" \
            ${extra[@]+"${extra[@]}"}
    done
    [ "$has_arrest" = 1 ] || continue
    init=()
    [ "$has_std" = 1 ] && init=(--init "$OUT/std-s$seed") # fine-tune this script's standard run
    train "$OUT/arrest-s$seed" --recipe "arrest-$ARCH-$DATASET" ${init[@]+"${init[@]}"} ${SETS[@]+"${SETS[@]}"} \
        --set train.seed="$seed" ${ARREST_SETS[@]+"${ARREST_SETS[@]}"}
done

"$ARAT" table "$OUT" --out "$OUT/table.md" --plot "$OUT/tradeoff.png"
echo "reproduce: table in $OUT/table.md, plot in $OUT/tradeoff.png"
