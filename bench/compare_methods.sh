#!/usr/bin/env bash
# CPU-sized comparison of the seed table's methods on real CIFAR-10 (docs/methods.md, "Evidence on real data"):
# one small network (ResNet-18 at width 16), one budget (20k training images, $EPOCHS epochs, PGD-5 training),
# every method with its own loss hyper-parameters; clean and PGD-20 on 1000 test images, AutoAttack (standard) on
# $AA_N; then `arat table` renders the markdown table and the trade-off plot beside the seed's published points.
#
#   bash bench/compare_methods.sh [OUT_DIR]        (default: the checkout's runs/compare)
#   env: DATA_DIR (default $ARAT_DATA_DIR, else the checkout's data/; paths relative to the caller's folder), SEEDS ("0"; e.g. "0 1 2" for mean ± std), EPOCHS (5),
#        AA_N (1000), ABLATIONS (0; 1 adds the four ablation rows with analysis.grad_sim on),
#        METHODS ("std at trades mart lbgat arat arrest"; arrest fine-tunes the std run, so it needs std)
#
# Interrupted? Run it again: finished runs are kept, unfinished ones resume from their last epoch.
set -euo pipefail
ROOT=$(CDPATH="" cd -- "$(dirname -- "$0")/.." && pwd)
OUT=${1:-$ROOT/runs/compare}
DATA_DIR=${DATA_DIR:-${ARAT_DATA_DIR:-$ROOT/data}}
SEEDS=${SEEDS:-0}
EPOCHS=${EPOCHS:-5}
AA_N=${AA_N:-1000}
ABLATIONS=${ABLATIONS:-0}

if [ ! -d "$DATA_DIR/cifar-10-batches-py" ]; then
  echo "compare_methods: no real CIFAR-10 in $DATA_DIR; prepare it (python $ROOT/../shared/data/cifar10/prepare.py $DATA_DIR" \
    "or arat data download --data-dir $DATA_DIR) or set DATA_DIR" >&2
  exit 2
fi

METHODS=${METHODS:-std at trades mart lbgat arat arrest}
listed=" $(echo $METHODS) "  # words separated by single spaces, whatever whitespace METHODS used
case $listed in
  *" arrest "*) case $listed in *" std "*) ;; *)
    echo "compare_methods: METHODS lists arrest without std; ARREST fine-tunes this comparison's std run: add std" >&2
    exit 2 ;; esac ;;
esac

DECAY=$((EPOCHS > 1 ? EPOCHS - 1 : 1))  # lr x0.1 for the last epoch
COMMON=(
  --set model.width=16 --set data.train_subset=20000
  --set train.epochs="$EPOCHS" --set optim.milestones="$DECAY"
  --set attack.num_steps=5 --set attack.step_size=2.5/255
  --set eval.attacks=clean,pgd20,aa --set eval.num_examples=1000 --set eval.aa_num_examples="$AA_N"
  --set eval.batch_size=250
)
# scripts/reproduce.sh runs the recipes (skipping finished runs, resuming interrupted ones) and `arat table`; ARREST
# fine-tunes this comparison's standard-trained network for the same budget; it finds arat itself unless ARAT is set
DATA_DIR=$DATA_DIR SEEDS=$SEEDS ABLATIONS=$ABLATIONS ARCH=resnet18 DATASET=cifar10 SWA=0 NPROC=1 \
  METHODS=$METHODS ARREST_SET="--set method.finetune_milestones=$DECAY" \
  exec bash "$ROOT/scripts/reproduce.sh" "$OUT" "${COMMON[@]}"
