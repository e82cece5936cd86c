#!/usr/bin/env bash
# Prepare the GPU check's offline files in .gpucheck/ (git-ignored), on a CPU machine, before a GPU window
# (../shared/docs/GPU_CHECK.md, "Files"). Idempotent; only the wheel download needs the network.
#
#   bash scripts/gpu_check_prepare.sh             # prepare, then run the --cpu-smoke check (needs .venv/)
#   bash scripts/gpu_check_prepare.sh --no-smoke  # prepare only
#
# The GPU machine has no network: pyautoattack comes from the wheel here, CIFAR-10 from the JPEG archive (its
# prepare.py writes the official layout there in ~15 s). The copied tree plus .gpucheck/ must stay <= 60 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEEL=pyautoattack-0.2.0-py3-none-any.whl
WHEEL_BYTES=42437197
WHEEL_SHA256=ce84de323b52ca109949d07a9df8e2f1072a8742bd951a020a678259f93f652d
DATA=../shared/data/cifar10
LIMIT_BYTES=$((60 * 1024 * 1024))
SMOKE_PYTHON=${PYTHON:-.venv/bin/python}
SMOKE=1
case "${1:-}" in
--no-smoke) SMOKE=0 ;;
'') ;;
*) echo "usage: bash scripts/gpu_check_prepare.sh [--no-smoke]" >&2 && exit 2 ;;
esac

say() { echo "gpu_check_prepare: $*"; }
sha_of() { sha256sum "$1" | cut -d' ' -f1; }
wheel_ok() { [ -f ".gpucheck/$WHEEL" ] && [ "$(stat -c %s ".gpucheck/$WHEEL")" = "$WHEEL_BYTES" ] &&
    [ "$(sha_of ".gpucheck/$WHEEL")" = "$WHEEL_SHA256" ]; }

# 1. the folder (.gitignore lists /.gpucheck/ and /gpu_check_out/)
mkdir -p .gpucheck

tree_size() { # the copied tree: tracked and untracked files, not ignored (a tracked file deleted in the tree is not copied)
    git ls-files -co --exclude-standard -z | xargs -0 stat -c %s 2>/dev/null | awk '{ s += $1 } END { print s + 0 }' ||
        true
}
slim_ok() { [ -f .gpucheck/site/pyautoattack/__init__.py ] && [ -f .gpucheck/site/pyautoattack/autoattack.py ]; }
wheel_fits() { # the full form: the tree, the wheel, the data files and the commit stamp
    local data=0 name
    for name in cifar10-jpeg.tar.gz labels.npz prepare.py; do
        [ -f "$DATA/$name" ] && data=$((data + $(stat -c %s "$DATA/$name")))
    done
    [ $(($(tree_size) + WHEEL_BYTES + data + 4096)) -le "$LIMIT_BYTES" ]
}

# 2. the pyautoattack wheel (no dependencies), pinned by size and sha256; where it would not fit and the slim form
# (step 5) is already here, nothing to fetch
if wheel_ok; then
    say "$WHEEL present (sha256 ok)"
elif slim_ok && ! wheel_fits; then
    say "slim form present in .gpucheck/site (the wheel would not fit within 60 MiB with this tree)"
else
    rm -f ".gpucheck/$WHEEL"
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .gpucheck pyautoattack==0.2.0
    if ! wheel_ok; then
        say "ERROR: .gpucheck/$WHEEL is not the pinned file ($WHEEL_BYTES bytes, sha256 $WHEEL_SHA256)"
        exit 1
    fi
    rm -rf .gpucheck/site # the wheel replaces an earlier slim form
    say "downloaded $WHEEL (sha256 ok)"
fi

# 3. real CIFAR-10 as JPEGs (19.6 MB) and the script that writes the official layout from them
for name in cifar10-jpeg.tar.gz labels.npz prepare.py; do
    [ -f "$DATA/$name" ] || { say "ERROR: $DATA/$name is missing" && exit 1; }
    cmp -s "$DATA/$name" ".gpucheck/$name" || cp -f "$DATA/$name" ".gpucheck/$name"
done
say "copied $DATA/{cifar10-jpeg.tar.gz,labels.npz,prepare.py}"

# 4. the commit (the GPU machine's copy may lack .git); untracked files are copied too, so they count as dirty
{ git rev-parse HEAD && [ -z "$(git status --porcelain)" ] || echo dirty; } >.gpucheck/commit.txt
say "commit.txt: $(paste -sd' ' .gpucheck/commit.txt)"
# and every copied file's sha256: the GPU machine's env stage names the files changed since (a stale stamp)
# (a tracked file deleted from the tree, or a submodule, has no sum: left out, and the script goes on)
git ls-files -co --exclude-standard -z | xargs -0 sha256sum -- >.gpucheck/files.sha256 2>/dev/null || true
say "files.sha256: $(wc -l <.gpucheck/files.sha256) files"

# 5. size guard: the copied tree (tracked and untracked, not ignored) plus .gpucheck/ <= 60 MiB, else the slim form
tree_bytes=$(tree_size)
extra_bytes=$(du -sb .gpucheck | cut -f1)
total=$((tree_bytes + extra_bytes))
if [ "$total" -gt "$LIMIT_BYTES" ] && [ -f ".gpucheck/$WHEEL" ]; then
    say "tree $tree_bytes + .gpucheck $extra_bytes = $total bytes > 60 MiB: switching to the slim form"
    say "(pyautoattack/*.py without examples/ in .gpucheck/site/; real_run loses only the model_test.pt check)"
    rm -rf .gpucheck/site
    python3 - ".gpucheck/$WHEEL" .gpucheck/site <<'EOF'
import sys
import zipfile

wheel, site = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.startswith("pyautoattack/") and n.endswith(".py") and "/examples/" not in n]
    z.extractall(site, names)
print(f"unpacked {len(names)} files into {site}")
EOF
    rm -f ".gpucheck/$WHEEL"
    extra_bytes=$(du -sb .gpucheck | cut -f1)
    total=$((tree_bytes + extra_bytes))
fi
form=$([ -f ".gpucheck/$WHEEL" ] && echo "full (wheel)" || echo "slim (.gpucheck/site)")
say "size: tree $tree_bytes + .gpucheck $extra_bytes = $total bytes of $LIMIT_BYTES; form: $form"
[ "$total" -le "$LIMIT_BYTES" ] || { say "ERROR: still over 60 MiB: shrink the tree" && exit 1; }

# 6. the whole check, CPU-sized, into a temporary folder: exit 0 and a schema-valid gpu_check.json
[ "$SMOKE" = 1 ] || exit 0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
say "running the --cpu-smoke check (~2 min) in $tmp"
GPU_CHECK_OUT="$tmp/out" GPU_CHECK_WORK="$tmp/work" PYTHON="$SMOKE_PYTHON" bash scripts/gpu_check.sh --cpu-smoke ||
    { say "ERROR: the --cpu-smoke check failed (see above)" && exit 1; }
"$SMOKE_PYTHON" - "$tmp/out" <<'EOF'
import json
import sys

sys.path.insert(0, "scripts")
from gpucheck.schema import check_output_dir, validate

out = sys.argv[1]
problems = validate(json.load(open(f"{out}/gpu_check.json"))) + check_output_dir(out)
stages = json.load(open(f"{out}/gpu_check.json"))["stages"]
problems += [f"stage {n} {r['status']}" for n, r in stages.items() if r["status"] in ("failed", "timeout")]
if problems:
    sys.exit("gpu_check_prepare: ERROR: " + "; ".join(problems))
print("gpu_check_prepare: --cpu-smoke ok, gpu_check.json valid (arat-gpu-check/1)")
EOF
say "ready: copy the tree with .gpucheck/ to the GPU machine and run: bash scripts/gpu_check.sh"
