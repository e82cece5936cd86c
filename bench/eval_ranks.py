"""Evaluation speed-up with ranks: the same `arat eval` (its chunks round-robin over the ranks) under `torchrun
--nproc_per_node N` for each N, on one machine, with the per-image flags of every N checked against the first.

Issue 10's figure "near-linear speed-up with ranks". On a GPU machine each rank has its own GPU. On a CPU the cores
are shared, so by default every N gets the same cores in total (`--threads`, split evenly over its ranks): the
figure then says how well ranks use the cores against threads within one process. With `--threads-per-rank 1` each
rank has a core of its own, as each has a GPU: the figure then says how the evaluation scales with ranks. Each row:
the evaluation's own seconds (rank 0's wall time over the attacks, start-up excluded), the speed-up and efficiency
against the first N, and the balance (the chunks' summed seconds over N x the wall time: 1.0 when every rank
attacked for the whole time; AutoAttack chunks of robust images take longer, so few chunks per rank balance badly).

    python bench/eval_ranks.py --target runs/gap --num-examples 100 --chunk-size 25          # AutoAttack standard
    python bench/eval_ranks.py --target runs/gap --attacks pgd20 --num-examples 1000 --chunk-size 125
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import REPO, append_jsonl, markdown_table, provenance, run_cli


def checkpoint_of(target: str) -> Path:
    """A run directory's checkpoint (so `arat eval` writes nothing into the run), or the file itself."""
    from engine.cli import resolve_target

    return resolve_target(target)[0]


def eval_command(ckpt: Path, ranks: int, args, out: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
            "-m", "engine.cli", "eval", str(ckpt), "--attacks", args.attacks, "--num-examples", str(args.num_examples),
            "--batch-size", str(args.batch_size), "--chunk-size", str(args.chunk_size), "--aa-version", args.aa_version,
            "--seed", str(args.seed), "--device", args.device, "--compile", args.compile,
            "--out", str(out)]  # fmt: skip


def run_once(ckpt: Path, ranks: int, args, work: Path) -> dict:
    """One `arat eval` under torchrun: its record's per-attack figures, its flags, and the process's wall time."""
    out = work / f"ranks{ranks}"
    shutil.rmtree(out, ignore_errors=True)  # fresh: no chunk of an earlier round is reused
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    threads = None
    if runs_on_cpu(args):
        threads = args.threads_per_rank or max(1, args.threads // ranks)
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    proc = subprocess.run(eval_command(ckpt, ranks, args, out), cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"eval_ranks: the {ranks}-rank evaluation failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return {
        "threads_per_rank": threads,
        "results": record_results(out),
        "flags": json.loads((out / "flags.json").read_text()),
        "wall_seconds": wall,
    }


def record_results(out: Path) -> dict:
    """An `arat eval --out OUT` record's figures keyed by attack name: the record keys AutoAttack's legacy-10 as
    "aa-legacy-10" (each protocol apart in a run's files); one evaluation runs one protocol, so here it is "aa"."""
    (record,) = sorted((out / "records").glob("*.json"))
    results = json.loads(record.read_text())["results"]
    return {"aa" if attack.startswith("aa-") else attack: figures for attack, figures in results.items()}


def runs_on_cpu(args) -> bool:
    """Whether the ranks evaluate on the CPU (--device cpu, or auto on a machine without CUDA)."""
    import torch

    return args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())


def row(ranks: int, runs: list[dict], base: dict | None, attacks: list[str], reference: dict) -> dict:
    """The median round's figures for `ranks`, against the first N's (`base`, None for the first N itself);
    `reference`: the flags every round of every N must equal (the first N's first round)."""
    seconds = [sum(r["results"][a]["seconds"] for a in attacks) for r in runs]
    median = statistics.median(seconds)
    last = runs[-1]["results"]
    busy = [sum(r["results"][a]["chunk_seconds"] for a in attacks) for r in runs]
    balance = [b / (ranks * s) for b, s in zip(busy, seconds, strict=True) if s > 0]
    out = {
        "ranks": ranks,
        "threads_per_rank": runs[0]["threads_per_rank"],
        "eval_seconds": round(median, 2),
        "eval_seconds_rounds": [round(s, 2) for s in seconds],
        "wall_seconds": round(statistics.median(r["wall_seconds"] for r in runs), 2),
        "chunks": {a: last[a]["chunks"] for a in attacks},
        "balance": round(statistics.median(balance), 3) if balance else None,
        "accuracy": {a: last[a]["accuracy"] for a in attacks},
        "flags_identical": all(r["flags"] == reference for r in runs),
    }
    if base is not None:
        out["speed_up"] = round(base["eval_seconds"] / out["eval_seconds"], 3) if out["eval_seconds"] > 0 else None
        out["efficiency"] = round(out["speed_up"] / (ranks / base["ranks"]), 3) if out["speed_up"] else None
    else:
        out["speed_up"], out["efficiency"] = 1.0, 1.0
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True, metavar="RUN_OR_CHECKPOINT", help="a run directory or checkpoint")
    p.add_argument("--attacks", default="aa", help="comma list of clean, pgd20, aa (default aa)")
    p.add_argument("--aa-version", choices=["standard", "legacy-10"], default="standard")
    p.add_argument("--num-examples", type=int, default=100)
    p.add_argument("--chunk-size", type=int, default=25, help="images per chunk; give every rank several chunks")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--ranks", default="1,2", help="comma list of rank counts, the first is the baseline")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="CPU: threads in total, split evenly over the ranks (default: every core)")  # fmt: skip
    p.add_argument("--threads-per-rank", type=int, default=0,
                   help="CPU: this many threads in every rank instead (1: a core per rank)")  # fmt: skip
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (one GPU per rank)")
    p.add_argument(
        "--compile",
        choices=["auto", "on", "off"],
        default="off",
        help="torch.compile the classifier "
        "(default off: its compile time would count as evaluation, cold caches in the first N only)",
    )
    p.add_argument("--rounds", type=int, default=1, help="repeat the whole sequence; rows report the median")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/eval_ranks.jsonl")
    args = p.parse_args()
    try:
        ranks = [int(n) for n in args.ranks.split(",")]
    except ValueError:
        p.error(f"--ranks {args.ranks!r}: expected comma-separated counts, e.g. 1,2")
    ranks = list(dict.fromkeys(ranks))  # a count given twice runs once (its rounds would double its entries)
    if not ranks or min(ranks) < 1 or min(args.num_examples, args.chunk_size, args.rounds, args.threads) < 1:
        p.error("--ranks, --num-examples, --chunk-size, --rounds and --threads must be positive")
    if args.threads_per_rank < 0:
        p.error("--threads-per-rank must be positive (or 0: split --threads over the ranks)")
    on_cpu = runs_on_cpu(args)
    if on_cpu and not args.threads_per_rank and max(ranks) > args.threads:
        print(f"eval_ranks: {max(ranks)} ranks on --threads {args.threads}: each rank still gets a thread, so that row "
              "uses more threads in total than the others (oversubscribed)", file=sys.stderr)  # fmt: skip
    attacks = [a for a in args.attacks.split(",") if a]
    ckpt = checkpoint_of(args.target)
    runs: dict[int, list[dict]] = {n: [] for n in ranks}
    with tempfile.TemporaryDirectory(prefix="eval_ranks-") as work:
        for k in range(args.rounds):  # rounds interleave the rank counts: drift hits every N alike
            for n in ranks:
                print(f"round {k + 1}/{args.rounds}: {n} rank(s)", flush=True)
                runs[n].append(run_once(ckpt, n, args, Path(work)))
    reference = runs[ranks[0]][0]["flags"]
    base = row(ranks[0], runs[ranks[0]], None, attacks, reference)
    rows = [base] + [row(n, runs[n], base, attacks, reference) for n in ranks[1:]]
    stamp = provenance("cpu" if on_cpu else "cuda")
    config = {"bench": "eval_ranks", "target": str(ckpt), "attacks": args.attacks, "aa_version": args.aa_version,
              "num_examples": args.num_examples, "chunk_size": args.chunk_size, "batch_size": args.batch_size,
              "compile": args.compile, "device_asked": args.device, "seed": args.seed,
              "rounds": args.rounds}  # fmt: skip
    rows = [config | r | stamp for r in rows]
    append_jsonl(args.out, rows)
    columns = ["ranks", "threads_per_rank", "eval_seconds", "speed_up", "efficiency", "balance", "flags_identical"]
    print(markdown_table(rows, columns))
    print(f"({args.attacks}, {args.num_examples} images, chunks of {args.chunk_size}; {stamp['cpu']}; {args.out})")


if __name__ == "__main__":
    run_cli(main, "bench/eval_ranks.py")
