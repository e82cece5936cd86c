#!/usr/bin/env bash
# The GPU check: one command that turns a short GPU window into verified numbers (../shared/docs/GPU_CHECK.md).
#
#   bash scripts/gpu_check.sh                                  # every stage, within $GPU_CHECK_BUDGET_S (480 s)
#   bash scripts/gpu_check.sh --stages compile --budget 170    # re-run one stage; the merge keeps the others
#   bash scripts/gpu_check.sh --cpu-smoke                      # CPU-sized run of every stage (CI, the prepare step)
#   bash scripts/gpu_check.sh --stages compile,methods --cap methods=120 --budget 290   # a stage's cap raised
#
# Each stage is its own process under `timeout`, so a CUDA fault ends one stage, not the check. Outputs (at most 8
# files) go to $GPU_CHECK_OUT ($OUT where that folder exists, else gpu_check_out/), merged after every stage so a
# killed check keeps them; scratch and caches go to $GPU_CHECK_WORK (/tmp/gc). Prepare the offline files first:
# bash scripts/gpu_check_prepare.sh
set -uo pipefail # no -e: a failing stage is recorded and the check goes on
cd "$(dirname "$0")/.."

# stage:cap in seconds, in priority order; scripts/gpucheck/__init__.py holds the same list (a test compares)
STAGES=(env:25 ceilings:15 kernels_correct:40 kernels_speed:35 step_eager:60 compile:150 methods:35 real_run:105
    probes:35 pytest_kernels:45 eval:150)
MIN_STAGE_S=15 # a stage with less time left than this is skipped (reason: budget)
RESERVE_S=10   # kept for the merge at the end

PYTHON=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-480}
DEVICE_OUT=${OUT:-} # the device tool's $OUT (an empty folder whose files come back): the default when it exists
[ -n "$DEVICE_OUT" ] && [ -d "$DEVICE_OUT" ] || DEVICE_OUT=gpu_check_out
OUT=${GPU_CHECK_OUT:-$DEVICE_OUT}
W=${GPU_CHECK_WORK:-/tmp/gc}
SMOKE=()
SELECTED=""
CAP_OVERRIDES=() # name=seconds: this run's cap for a stage (e.g. methods, whose 15 cases need ~2 minutes)

usage() {
    sed -n '2,12p' scripts/gpu_check.sh | sed 's/^# \{0,1\}//' # (after the cd above: $0 may be relative)
    exit "${1:-0}"
}

while [ $# -gt 0 ]; do
    case "$1" in
    --stages) SELECTED=${2:?--stages needs a comma-separated list} && shift 2 ;;
    --stages=*) SELECTED=${1#*=} && shift ;;
    --budget) BUDGET=${2:?--budget needs seconds} && shift 2 ;;
    --budget=*) BUDGET=${1#*=} && shift ;;
    --cap) CAP_OVERRIDES+=("${2:?--cap needs NAME=SECONDS}") && shift 2 ;;
    --cap=*) CAP_OVERRIDES+=("${1#*=}") && shift ;;
    --cpu-smoke) SMOKE=(--cpu-smoke) && shift ;;
    -h | --help) usage 0 ;;
    *) echo "gpu_check.sh: unknown option $1" >&2 && usage 2 ;;
    esac
done

stage_names() { for entry in "${STAGES[@]}"; do echo "${entry%%:*}"; done; }
is_stage() { for entry in "${STAGES[@]}"; do [ "${entry%%:*}" = "$1" ] && return 0; done; return 1; }
if [ -n "$SELECTED" ]; then
    for name in ${SELECTED//,/ }; do
        # no `stage_names | grep -q`: under pipefail grep's early exit can SIGPIPE the writer and fail the test at
        # random (the unexplained CI failure of test_the_device_tools_out_folder_is_the_default_output)
        if ! is_stage "$name"; then
            echo "gpu_check.sh: unknown stage $name (one of $(stage_names | paste -sd,))" >&2
            exit 2
        fi
    done
fi
for override in "${CAP_OVERRIDES[@]}"; do
    name=${override%%=*} seconds=${override#*=}
    if [[ "$override" != *=* ]] || ! is_stage "$name"; then
        echo "gpu_check.sh: --cap takes NAME=SECONDS with NAME one of $(stage_names | paste -sd,), got $override" >&2
        exit 2
    fi
    case "$seconds" in '' | *[!0-9]*) echo "gpu_check.sh: --cap $name needs whole seconds, got $seconds" >&2 && exit 2 ;; esac
done
cap_of() { # name default: the last --cap NAME=S given, else the default
    local cap=$2 override
    for override in "${CAP_OVERRIDES[@]}"; do [ "${override%%=*}" = "$1" ] && cap=${override#*=}; done
    echo "$cap"
}
selected() { [ -z "$SELECTED" ] || [[ ",$SELECTED," == *",$1,"* ]]; }
case "$BUDGET" in '' | *[!0-9]*) echo "gpu_check.sh: --budget needs whole seconds, got $BUDGET" >&2 && exit 2 ;; esac

now_ms() { date +%s%3N; }
seconds_since() { awk -v a="$1" -v b="$(now_ms)" 'BEGIN { printf "%.1f", (b - a) / 1000 }'; }
START_MS=$(now_ms)
mkdir -p "$W" "$OUT" || exit 2
W=$(cd "$W" && pwd)

# -- environment: the package is not installed (python -m engine.cli, not arat); every cache lives under $W --------
export PYTHONPATH="$W/site:$PWD" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export TRITON_CACHE_DIR="$W/cache/triton" TORCHINDUCTOR_CACHE_DIR="$W/cache/inductor" ARAT_CACHE_DIR="$W/cache/arat"
export XDG_CACHE_HOME="$W/cache/xdg" MPLCONFIGDIR="$W/cache/mpl" TRITON_HOME="$W/cache/triton-home"
export CUDA_CACHE_PATH="$W/cache/nv" TORCH_HOME="$W/cache/torch"
unset TRITON_INTERPRET
if [ ${#SMOKE[@]} -gt 0 ]; then
    export TRITON_INTERPRET=1                    # Triton kernels run interpreted on CPU tensors
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} # one thread per stage: a shared 2-core CI machine oversubscribes
fi
mkdir -p "$W/cache" "$W/site"
if [ -z "$SELECTED" ]; then # a full run starts clean: the merges after each stage must not show an earlier run's
    for name in $(stage_names); do rm -f "$W/$name.json" "$W/$name.status" "$W/$name.log"; done
fi
printf '{"started": "%s", "started_ms": %s, "budget_s": %s, "cpu_smoke": %s, "stages": "%s"}\n' \
    "$(date -Iseconds)" "$START_MS" "$BUDGET" "$([ ${#SMOKE[@]} -gt 0 ] && echo true || echo false)" \
    "${SELECTED:-all}" >"$W/run.json"

# -- background data prep (t=0): real_run waits for it; it is never left running ---------------------------------
PREP_PID=""
stop_prep() {
    if [ -n "$PREP_PID" ] && kill -0 "$PREP_PID" 2>/dev/null; then
        kill "$PREP_PID" 2>/dev/null
        wait "$PREP_PID" 2>/dev/null
        echo "data prep (pid $PREP_PID) was still running: stopped" | tee -a "$W/prepare.log"
    fi
    PREP_PID=""
}
merge_quietly() { # after every stage: a check killed later (the device's command limit) still leaves its outputs
    timeout -k 5 30 "$PYTHON" scripts/gpu_check.py --merge "$W" --out "$OUT" >"$W/merge.log" 2>&1
}
STAGE_PID="" STAGE_NAME="" STAGE_LIMIT="" STAGE_T0=""
stop_stage() { # the check itself stopped (the device's command limit): the running stage flushes its rows first
    if [ -n "$STAGE_PID" ] && kill -0 "$STAGE_PID" 2>/dev/null; then
        kill -TERM "$STAGE_PID" 2>/dev/null # timeout(1) passes it on: the stage's handler writes what it measured
        for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$STAGE_PID" 2>/dev/null || break; sleep 0.5; done
        # its status says so (the stage's own record reads "stopped at the stage's cap"; it was not its cap)
        write_status "$STAGE_NAME" timeout 130 "$(seconds_since "$STAGE_T0")" "$STAGE_LIMIT" \
            "the check was stopped (a signal) before this stage's cap"
    fi
}
# the stage runs in the background and the check waits for it: a signal to a script waiting in the foreground is
# handled only once that stage has ended, and a kill after the signal then lost the running stage's rows
trap 'stop_stage; stop_prep; merge_quietly; exit 130' INT TERM
if { selected real_run || selected eval; } && [ ${#SMOKE[@]} -eq 0 ] &&
    [ ! -f "$W/data/cifar-10-batches-py/batches.meta" ]; then
    if [ -f .gpucheck/prepare.py ]; then
        "$PYTHON" .gpucheck/prepare.py "$W/data" >"$W/prepare.log" 2>&1 &
        PREP_PID=$!
    else
        echo "no .gpucheck/prepare.py: run scripts/gpu_check_prepare.sh first (real_run needs CIFAR-10)" \
            >"$W/prepare.log"
    fi
fi
export GPU_CHECK_PREP_PID=$PREP_PID

# -- prelude: pyautoattack from the prepared wheel (never from a registry); a failure only skips what needs it -----
prelude() {
    local wheels=(.gpucheck/pyautoattack-*.whl)
    if [ -f "$W/site/pyautoattack/__init__.py" ]; then
        echo "pyautoattack already in $W/site"
    elif [ -f "${wheels[0]}" ]; then
        if timeout -k 5 20 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$W/site" \
            "${wheels[@]}"; then
            echo "installed ${wheels[*]} into $W/site"
        else
            echo "pip install failed (rc $?): the stages needing pyautoattack skip it"
        fi
    elif [ -d .gpucheck/site ]; then
        cp -r .gpucheck/site/. "$W/site/" && echo "copied the slim .gpucheck/site/ (no examples/model_test.pt)"
    else
        echo "no .gpucheck/ (run scripts/gpu_check_prepare.sh): pyautoattack comes from the environment, if at all"
    fi
}
prelude >"$W/pip.log" 2>&1
echo "== prelude: $(tail -n 1 "$W/pip.log") ($(seconds_since "$START_MS")s)"

# -- stages ----------------------------------------------------------------------------------------------------
FAILED=0
write_status() { # name status rc seconds cap reason
    printf '{"stage": "%s", "status": "%s", "rc": %s, "seconds": %s, "cap_s": %s, "reason": %s}\n' \
        "$1" "$2" "$3" "$4" "$5" "$([ -n "$6" ] && echo "\"$6\"" || echo null)" >"$W/$1.status"
}
run_stage() { # name cap
    local name=$1 cap=$2 elapsed left limit t0 rc status
    rm -f "$W/$name.json" "$W/$name.status" "$W/$name.log"
    elapsed=$((($(now_ms) - START_MS) / 1000))
    left=$((BUDGET - elapsed - RESERVE_S))
    limit=$((cap < left ? cap : left))
    if [ "$limit" -lt "$MIN_STAGE_S" ]; then
        write_status "$name" skipped null 0 "$cap" budget
        echo "== $name skipped 0s (elapsed ${elapsed}s): budget, ${left}s left"
        return
    fi
    t0=$(now_ms)
    STAGE_NAME=$name STAGE_LIMIT=$limit STAGE_T0=$t0
    timeout -k 5 "$limit" "$PYTHON" scripts/gpu_check.py --stage "$name" --json "$W/$name.json" --budget "$limit" \
        "${SMOKE[@]}" >"$W/$name.log" 2>&1 </dev/null &
    STAGE_PID=$!
    wait "$STAGE_PID"
    rc=$?
    STAGE_PID=""
    case $rc in 0) status=ok ;; 124 | 137) status=timeout ;; *) status=failed ;; esac
    [ "$status" = ok ] || FAILED=1
    write_status "$name" "$status" "$rc" "$(seconds_since "$t0")" "$limit" ""
    echo "== $name $status $(seconds_since "$t0")s (elapsed $(seconds_since "$START_MS")s)"
    tail -n 3 "$W/$name.log" | cut -c1-300 | sed 's/^/   /'
}
for entry in "${STAGES[@]}"; do
    selected "${entry%%:*}" && run_stage "${entry%%:*}" "$(cap_of "${entry%%:*}" "${entry##*:}")" && merge_quietly
done

stop_prep
trap - INT TERM
# the merge prints the summary table last, so the end of the console output alone holds the answer
timeout -k 5 60 "$PYTHON" scripts/gpu_check.py --merge "$W" --out "$OUT" || FAILED=1
exit "$FAILED"
