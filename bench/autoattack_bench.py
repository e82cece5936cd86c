"""AutoAttack seconds per 1,000 images: the previous evaluation path against the chunked one, same model and images.

- `per-batch` (the evaluation before chunking): one AutoAttack per batch of test images, one seed for all.
- `chunked` (engine.evaluate today): fixed chunks with their own seeds, shardable over ranks (here no record
  folder: nothing is saved, so the time to save each chunk is not in the figure).

Both run the original AutoAttack code on the same images in one process, with the weights frozen (as engine.evaluate
runs it), after an untimed warm-up, in alternating order round by round, so the ratio is what the restructuring
costs or saves on this machine (on a CPU the attack's arithmetic dominates both; the gains
the chunking is for, ranks and large static batches on a GPU, are not measured here).

    python bench/autoattack_bench.py --run runs/demo           # the demo model (default: the newest runs/demo*)
    python bench/autoattack_bench.py --num-examples 200 --batch-size 100 --version legacy-10
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from harness import REPO, append_jsonl, bench_device, markdown_table, positive_int, provenance, run_cli

from engine import autoattack
from engine.attacks.pgd import frozen
from engine.config import EvalConfig, default_data_dir
from engine.data import load_split
from engine.errors import UserError
from engine.evaluate import evaluate, repeatable_kernels, test_tensors
from engine.hub import load_model
from engine.perf import EvalForward


def newest_demo_run() -> Path:
    """The newest finished demo run (runs/demo, runs/demo-<date>) under ./runs, else under the checkout's runs/
    (where scripts/demo.sh puts it)."""
    for root in dict.fromkeys([Path("runs"), REPO / "runs"]):
        runs = [*root.glob("demo/checkpoints/final.pt"), *root.glob("demo-*/checkpoints/final.pt")]
        if runs:
            return max(runs, key=lambda p: p.stat().st_mtime).parents[1]
    raise UserError("no runs/demo*/checkpoints/final.pt: run `bash scripts/demo.sh` first, or pass --run")


def add_model_arguments(p: argparse.ArgumentParser, num_examples: int) -> None:
    """The model and test images an AutoAttack benchmark runs on (read back by `model_and_test_split`)."""
    p.add_argument("--run", type=Path, default=None, help="run directory, exported .pt or plain state_dict "
                   "(default: the newest demo run)")  # fmt: skip
    p.add_argument("--data-dir", default=default_data_dir(), help="holds cifar-10-batches-py (default $ARAT_DATA_DIR)")
    p.add_argument("--num-examples", type=positive_int, default=num_examples, help="the first N test images")
    p.add_argument("--batch-size", type=positive_int, default=100, help="images per chunk and per forward")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")


def model_and_test_split(args: argparse.Namespace):
    """(where the model came from, the plain network: forward(x, bn=...) on --device, the test split of the
    network's dataset (CIFAR-10 or CIFAR-100, by its number of classes), the device); args.num_examples capped at
    the split's size."""
    device = bench_device(args.device)
    source = args.run or newest_demo_run()
    net = load_model(source).net
    classes = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1].out_features
    if classes not in (10, 100):
        raise UserError(f"{source} classifies {classes} classes: the AutoAttack benches run CIFAR-10 or CIFAR-100")
    split = load_split(f"cifar{classes}", args.data_dir, train=False)
    args.num_examples = min(args.num_examples, len(split))
    return source, net.to(device), split, device


def warm_up(net, split, cfg: EvalConfig, device) -> None:
    """Untimed: clean and PGD-20 on one batch, so that neither timed path pays the first forwards and backwards at
    the batch's shape (kernel selection, allocator growth) alone."""
    evaluate(net, split, replace(cfg, attacks=("clean", "pgd20"), num_examples=min(cfg.batch_size, cfg.num_examples)),
             device, seed=0)  # fmt: skip


def per_batch(net, x, y, version: str, batch_size: int) -> float:
    """The previous path: robust accuracy with one AutoAttack per batch (seed 0 throughout), under the cuDNN and
    Inductor settings the chunked path attacks under (else the ratio would mix algorithm choice in)."""
    hits = 0
    with repeatable_kernels():
        for i in range(0, len(y), batch_size):
            aa = autoattack.adversary(EvalForward(net), autoattack.PROTOCOLS[version], 0, x.device)
            aa.verbose = False
            with frozen(net):  # as engine.evaluate runs it (FAB's .backward() would compute weight gradients too)
                xs, ys = x[i : i + batch_size], y[i : i + batch_size]
                _, y_adv = aa.run_standard_evaluation(xs, ys, batch_size=batch_size)
            hits += int((y_adv == ys).sum())
    return hits / len(y)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(p, num_examples=100)
    p.add_argument("--version", default="standard", choices=sorted(autoattack.PROTOCOLS))
    p.add_argument("--rounds", type=positive_int, default=2, help="timed rounds, alternating which path runs first")
    p.add_argument("--out", default="bench/results/autoattack.jsonl")
    args = p.parse_args()
    source, net, split, device = model_and_test_split(args)
    x, y = test_tensors(split, args.num_examples, device)
    cfg = EvalConfig(attacks=("aa",), num_examples=args.num_examples, batch_size=args.batch_size,
                     chunk_size=args.batch_size, aa_version=args.version)  # fmt: skip
    net.to(memory_format=torch.channels_last)  # evaluate's layout (perf.channels_last) for both: the ratio is chunking
    paths = {
        "per-batch": lambda: per_batch(net, x, y, args.version, args.batch_size),
        "chunked": lambda: evaluate(net, split, cfg, device, seed=0)["aa"]["accuracy"],
    }
    warm_up(net, split, cfg, device)
    seconds: dict[str, list[float]] = {impl: [] for impl in paths}
    accuracy = {}
    for i in range(args.rounds):
        for impl in list(paths) if i % 2 == 0 else list(paths)[::-1]:
            start = time.perf_counter()
            accuracy[impl] = paths[impl]()
            seconds[impl].append(time.perf_counter() - start)
    stamp = provenance(device)
    base = statistics.median(seconds["per-batch"])
    rows = [
        {"bench": "autoattack", "impl": impl, "version": args.version, "model": str(source),
         "num_examples": args.num_examples, "batch_size": args.batch_size, "robust_accuracy": accuracy[impl],
         "seconds": round(statistics.median(s), 2), "seconds_per_1000": round(1000 * statistics.median(s) / len(y), 1),
         "vs_per_batch": round(base / statistics.median(s), 3)} | stamp
        for impl, s in seconds.items()
    ]  # fmt: skip
    append_jsonl(args.out, rows)
    print(f"{stamp['cpu']} ({stamp['cpu_threads']} threads), {source}")
    print(markdown_table(rows, ["impl", "version", "num_examples", "batch_size", "robust_accuracy", "seconds",
                                "seconds_per_1000", "vs_per_batch"]))  # fmt: skip


if __name__ == "__main__":
    run_cli(main, "bench/autoattack_bench.py")
