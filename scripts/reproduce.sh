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
#        analysis.grad_sim on), SWA (0; 1 adds AR-AT + SWA), NPROC (1; N trains and evaluates each
#        run under `torchrun --standalone --nproc_per_node N`, each process taking 128/N images of the batch of 128:
#        N must divide 128, unless a --set train.batch_size of yours, which wins, sets each process's batch),
#        DATA_DIR (default $ARAT_DATA_DIR, else the checkout's data/), PRUNE (0; 1 deletes each finished and
#        evaluated run's checkpoints/latest.pt, needed only to train it on: ~24 GB of a three-seed WRN-34-10 sweep
#        with ABLATIONS=1 SWA=1; final.pt, which eval, export, table and ARREST's --init read, stays),
#        ARREST_SET (extra --set arguments for ARREST only), ARAT (the arat command; default .venv/bin/arat, else
#        `arat` on PATH), TORCHRUN (default: the torchrun beside $ARAT)
#   Every --set after OUT_DIR goes to every new run (e.g. --set eval.aa_num_examples=1000 for a shorter evaluation);
#   an unfinished run resumed takes only its perf.*, dist.* (not dist.sync_bn) and eval.chunk_size/batch_size ones
#   (how it runs, not what it trains).
#
# Ctrl-C or SIGTERM stops the run in progress (its last finished epoch's checkpoint is kept; the epoch it was in is
# not saved) and then the script (exit 130 or 143).
# Interrupted? Run it again: finished runs are kept, unfinished ones resume from their last epoch (with the
# settings they started with). A run that fails is named and the others go on; the table then holds the finished
# runs and the script exits 1. One OUT_DIR holds one ARCH and DATASET (its run folders are named by method).
set -euo pipefail
from_caller() { # a path given relative to the caller's folder, made absolute (the script works from the checkout)
    local path=${1/#\~/$HOME} # a quoted "~/data" too
    if [[ $path == /* ]]; then echo "$path"; else echo "$PWD/$path"; fi
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
PRUNE=${PRUNE:-0}
NPROC=${NPROC:-1}
# --data-dir only where DATA_DIR/ARAT_DATA_DIR is set: arat's default is the checkout's data/ (scripts/setup.sh
# prepares it), and a resume given none keeps the data folder its run started with
DATA=()
[ -z "${DATA_DIR:-}" ] || DATA=(--data-dir "$DATA_DIR")
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
for ((i = 0; i < ${#ARREST_SETS[@]}; i += 2)); do # checked now, not when ARREST's turn comes days later
    [ "${ARREST_SETS[i]}" = --set ] && [ $((i + 1)) -lt ${#ARREST_SETS[@]} ] ||
        die "ARREST_SET takes only --set KEY=VALUE pairs (got '${ARREST_SETS[i]}')"
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
for flag in ABLATIONS SWA PRUNE; do
    case "${!flag}" in 0 | 1) ;; *) die "$flag=${!flag}: 0 or 1" ;; esac
done
# Under torchrun train.batch_size is each process's: NPROC ranks keep METHOD's batch of 128 (the recipes') at
# 128/NPROC each, unless a --set train.batch_size says otherwise (SWA's swa.every counts steps at that batch too)
BATCH=()
if [ "$NPROC" != 1 ] && [[ " ${SETS[*]-} " != *" train.batch_size="* ]]; then
    [ $((128 % NPROC)) = 0 ] || die "NPROC=$NPROC does not divide the recipes' batch of 128: use 2, 4, 8, 16 or 32" \
        "processes, or set each one's batch with --set train.batch_size=N"
    BATCH=(--set train.batch_size=$((128 / NPROC)))
    echo "reproduce: $NPROC processes x $((128 / NPROC)) images = the recipes' batch of 128 (train.batch_size is" \
        "each process's)"
fi
if [ "$DATASET" != cifar10 ] && [ "$ABLATIONS" = 1 ]; then
    die "ABLATIONS have CIFAR-10 recipes only: set DATASET=cifar10 or leave ABLATIONS=0"
fi

# what an interrupted arat says to continue: this script again (it resumes every unfinished run, with NPROC ranks)
export ARAT_CONTINUE_HINT="the same \`bash scripts/reproduce.sh\` command again"

arat_train() { # one process, or torchrun with NPROC ranks (evaluation included)
    if [ "$NPROC" = 1 ]; then
        run_child "$ARAT" train "$@"
    else
        run_child "$TORCHRUN" --standalone --nproc_per_node "$NPROC" -m engine.cli train "$@"
    fi
}

recorded_recipe() { # the recipe in RUN_DIR/config.json (empty if it names none)
    { grep -o '"recipe": *"[^"]*"' "$1/config.json" || true; } | head -n 1 | sed 's/.*"\([^"]*\)"$/\1/'
}

resume_sets() { # of the --set pairs in "$@", those a resume takes (arat's resume_takes); the others said, once per run
    local -a taken=() ignored=()
    while [ $# -gt 1 ]; do
        case "$2" in
            dist.sync_bn=*) ignored+=("$2") ;; # what the run trains
            perf.* | dist.* | eval.chunk_size=* | eval.batch_size=*) taken+=(--set "$2") ;;
            *) ignored+=("$2") ;;
        esac
        shift 2
    done
    [ ${#ignored[@]} -eq 0 ] || echo "reproduce: (resuming with its own settings: ${ignored[*]} not taken)" >&2
    echo "${taken[@]+"${taken[@]}"}"
}

failed=()
# Each run is a child this script waits on: a signal to the script (Ctrl-C, or SIGTERM from `timeout`, `kill` or a
# scheduler) is passed to the run as SIGTERM, which arat ends like Ctrl-C (its last finished epoch's checkpoint
# kept, the interrupted epoch lost), and the script stops after it. (A child run in the foreground outlived a
# SIGTERM'd script, holding its run's lock; a child started with & has Ctrl-C's SIGINT ignored, hence TERM for both.)
interrupted=0 # the status to stop with: 128 + the signal (130 after Ctrl-C, 143 after SIGTERM, 129 HUP, 138 USR1)
child=0
stop_run() {
    interrupted=$1
    [ "$child" = 0 ] || kill -TERM "$child" 2>/dev/null || true
}
trap 'stop_run 130' INT
trap 'stop_run 143' TERM
trap 'stop_run 129' HUP  # a closed terminal (under nohup: ignored, as nohup set it)
trap 'stop_run 138' USR1 # SLURM's --signal=USR1@T
run_child() { # "$@" as the run this script passes its signals to; returns its exit status
    local rc=0
    [ "$interrupted" = 0 ] || return "$interrupted" # a signal between two runs: start no other
    "$@" &
    child=$!
    [ "$interrupted" = 0 ] || kill -TERM "$child" 2>/dev/null || true # one before $child was set
    wait "$child" || rc=$?
    while [ "$interrupted" != 0 ] && kill -0 "$child" 2>/dev/null; do # the wait was cut by the signal: the run's end
        rc=0
        wait "$child" || rc=$?
    done
    child=0
    return "$rc"
}
train() { # train RUN_DIR RECIPE ARGS...: skip a finished run, resume an interrupted one; a failure is noted
    local run=$1 recipe=$2 rc=0
    shift 2
    if [ -f "$run/config.json" ] && [ "$(recorded_recipe "$run")" != "$recipe" ]; then
        die "$run holds a $(recorded_recipe "$run") run, not $recipe: give each ARCH/DATASET an OUT_DIR of its own"
    fi
    if [ -f "$run/results.json" ]; then
        echo "reproduce: $run is done"
        prune "$run"
        return
    elif [ -f "$run/config.json" ]; then
        echo "reproduce: resuming $run"
        local -a sets
        read -r -a sets <<<"$(resume_sets ${SETS[@]+"${SETS[@]}"})"
        arat_train --resume "$run" ${DATA[@]+"${DATA[@]}"} ${sets[@]+"${sets[@]}"} || rc=$?
    else
        echo "reproduce: training $run"
        arat_train --out "$run" ${DATA[@]+"${DATA[@]}"} --recipe "$recipe" ${BATCH[@]+"${BATCH[@]}"} "$@" || rc=$?
    fi
    [ "$interrupted" = 0 ] || exit "$interrupted" # the run stopped, its last epoch kept; stop here
    case $rc in 129 | 130 | 138 | 143) exit "$rc" ;; esac # a run stopped by a signal of its own (HUP, INT, USR1, TERM)
    [ "$rc" = 0 ] || failed+=("$run (exit $rc)")
    [ "$rc" != 0 ] || prune "$run"
}
prune() { # PRUNE=1: a finished, evaluated run's latest.pt goes (only a run trained on reads it)
    if [ "$PRUNE" = 1 ] && [ -f "$1/results.json" ] && [ -f "$1/checkpoints/final.pt" ] &&
        [ -f "$1/checkpoints/latest.pt" ]; then
        rm -f "$1/checkpoints/latest.pt"
        echo "reproduce: removed $1/checkpoints/latest.pt (PRUNE=1; final.pt kept)"
    fi
}

recipes=()
for name in $METHODS; do [ "$name" = arrest ] || recipes+=("$name-$ARCH-$DATASET"); done
[ "$SWA" = 1 ] && recipes+=("arat-swa-$ARCH-$DATASET")
if [ "$ABLATIONS" = 1 ]; then
    for v in v0 stopgrad splitbn arat; do recipes+=("ablation-$v-$ARCH-cifar10"); done
fi
# ${a[@]+"${a[@]}"}: an empty array expands to nothing under set -u on every bash (before 4.4 "${a[@]}" fails)
for seed in $SEEDS; do
    for recipe in ${recipes[@]+"${recipes[@]}"}; do
        extra=()
        [[ $recipe == ablation-* ]] && extra=(--set analysis.grad_sim=true)
        train "$OUT/${recipe%-"$ARCH"-*}-s$seed" "$recipe" ${SETS[@]+"${SETS[@]}"} --set train.seed="$seed" \
            ${extra[@]+"${extra[@]}"}
    done
    [ "$has_arrest" = 1 ] || continue
    init=()
    [ "$has_std" = 1 ] && init=(--init "$OUT/std-s$seed") # fine-tune this script's standard run
    train "$OUT/arrest-s$seed" "arrest-$ARCH-$DATASET" ${init[@]+"${init[@]}"} ${SETS[@]+"${SETS[@]}"} \
        --set train.seed="$seed" ${ARREST_SETS[@]+"${ARREST_SETS[@]}"}
done

finished=() # the runs with results (a failed or foreign folder in OUT is left out of the table)
for result in "$OUT"/*/results.json; do [ ! -f "$result" ] || finished+=("$(dirname "$result")"); done
if [ ${#finished[@]} -gt 0 ]; then
    "$ARAT" table "${finished[@]}" --out "$OUT/table.md" || echo "reproduce: no table (above)" >&2
    if "$ARAT" table "${finished[@]}" --plot "$OUT/tradeoff.png" >/dev/null; then
        echo "reproduce: table in $OUT/table.md, plot in $OUT/tradeoff.png"
    else
        echo "reproduce: table in $OUT/table.md (no plot: above)"
    fi
fi
if [ ${#failed[@]} -gt 0 ]; then
    echo "reproduce: ${#failed[@]} run(s) failed: ${failed[*]}; see their messages above, fix, then run this again" >&2
    exit 1
fi
