"""Compile every Triton kernel x config for sm_75, sm_80 and sm_90 ahead of time (no GPU needed) and report resources.

    python bench/aot_report.py --out bench/results/aot.jsonl

Prints a markdown table (registers per thread, static shared memory, local memory, spill bytes, float min/max
instructions that drop NaN) and appends one JSON line per kernel x config x arch (a failed compile: a row with its
error; the others still compile). Exits non-zero if any kernel fails to compile, spills, or has such a min/max.
"""

from __future__ import annotations

import argparse
import os
import sys

import harness  # noqa: F401  (puts the repository on sys.path)
from harness import append_jsonl, markdown_table, provenance, run_cli

from engine.errors import UserError

COLUMNS = [
    "kernel",
    "arch",
    "num_warps",
    "registers",
    "shared_bytes",
    "local_bytes",
    "spill_store_bytes",
    "spill_load_bytes",
    "nan_dropping_minmax",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/aot.jsonl", help="JSON-lines file to append to")
    parser.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90 (default: 75 80 90)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise UserError("unset TRITON_INTERPRET: interpreted kernels cannot be compiled ahead of time")
    try:
        from kernels import aot
    except ImportError as e:  # triton is the optional `kernels` extra
        raise UserError(f"{e}: install a recent Triton (pip install -e '.[kernels]') to compile the kernels") from None

    stamp = provenance("cpu") | {"device": "none (compiled ahead of time)"}  # a GPU, if any, is not used
    rows = [compiled_row(aot, spec, arch) | stamp for spec in aot.all_specs() for arch in args.arch or aot.ARCHS]
    print(markdown_table(rows, COLUMNS + (["error"] if any("error" in r for r in rows) else [])))
    append_jsonl(args.out, rows)
    failed = [r for r in rows if "error" in r]
    for row in failed:
        print(f"FAILED: {row['kernel']} on {row['arch']}: {row['error']}", file=sys.stderr)
    spilled = [r for r in rows if r.get("spill_store_bytes") or r.get("spill_load_bytes") or r.get("local_bytes")]
    for row in spilled:
        print(f"SPILL: {row['kernel']} on {row['arch']}", file=sys.stderr)
    nan_dropping = [r for r in rows if r.get("nan_dropping_minmax")]
    for row in nan_dropping:
        print(f"NAN: {row['kernel']} on {row['arch']}: a float min/max without .NaN (tl.PropagateNan.ALL)",
              file=sys.stderr)  # fmt: skip
    return 1 if spilled or nan_dropping or failed else 0


def compiled_row(aot, spec: dict, arch: int) -> dict:
    """One kernel x config x arch compiled; a compile that fails is a row with its error (the others still run)."""
    try:
        return aot.compile_spec(spec, arch)
    except Exception as e:  # noqa: BLE001  (Triton's compile errors have no common base)
        message = str(e).strip().splitlines()
        return {"kernel": spec["name"], "arch": f"sm_{arch}", "num_warps": spec["num_warps"],
                "error": f"{type(e).__name__}: {message[-1] if message else ''}"[:300]}  # fmt: skip


if __name__ == "__main__":
    run_cli(main, "bench/aot_report.py")
