"""Training-step throughput, feature by feature: images/s, step time, attack cost, achieved TFLOP/s.

Each row adds one performance switch to the previous one (fp32 eager -> channels-last -> bf16 autocast -> dual
forward -> fused kernels -> torch.compile), on the same AR-AT step (PGD attack + clean/adv forwards + SGD step).
FLOPs follow METHOD 9: per image and step, (2 * attack steps + 6) forward passes F, with F counted by
torch.utils.flop_counter on the network itself.

    python bench/train_step.py --quick                      # CPU-sized: ResNet-18 width 16, batch 64
    python bench/train_step.py --arch resnet18 --batch-size 128 --steps 20      # the real network (GPU)
    python bench/train_step.py --train-epochs 2 --data-dir data                 # plus accuracy after a short run

Rows go to --out (JSON lines); a markdown table is printed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from harness import append_jsonl, markdown_table, provenance
from torch.utils.flop_counter import FlopCounterMode

from engine.config import apply_overrides
from engine.methods.arat import attack_inputs
from engine.perf import peak_tflops
from engine.recipes import get_recipe
from engine.train import build_run, train_step

LADDER = [
    (
        "fp32 eager",
        [
            "perf.dtype=fp32",
            "perf.channels_last=false",
            "perf.dual_forward=false",
            "perf.kernels=off",
            "perf.cudnn_benchmark=off",
        ],
    ),
    ("+channels-last", ["perf.channels_last=true"]),
    ("+bf16 autocast", ["perf.dtype=bf16"]),
    ("+dual forward", ["perf.dual_forward=true"]),
    ("+fused kernels", ["perf.kernels=on"]),
    ("+cudnn.benchmark", ["perf.cudnn_benchmark=on"]),  # CUDA only: a no-op on CPU
    ("+torch.compile", ["perf.compile=true"]),
]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device: torch.device, reps: int) -> float:
    """Median wall time of `fn` in ms, synchronized with the device around each call."""
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def forward_flops(model: torch.nn.Module, x: torch.Tensor) -> float:
    """F: forward FLOPs per image (adv branch, eval mode)."""
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, bn="adv")
    model.train(was_training)
    return counter.get_total_flops() / len(x)


def measure(cfg, name: str, steps: int, warmup: int) -> dict:
    run = build_run(cfg)
    x, y = next(iter(run.train_loader))
    device = run.perf.device
    for _ in range(warmup):  # compile, autotune, allocator warm-up
        train_step(run, x, y)
    step_ms = median_ms(lambda: train_step(run, x, y), device, steps)
    attack_ms = median_ms(lambda: attack_inputs(run.nets, x, y, cfg.attack, run.perf.autocast), device, steps)
    flops = forward_flops(run.nets.raw, x[:8]) * (2 * cfg.attack.num_steps + 6)
    images_per_s = len(y) / (step_ms / 1e3)
    tflops = images_per_s * flops / 1e12
    peak = peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    return {
        "bench": "train_step", "config": name, "arch": cfg.model.arch, "width": cfg.model.width,
        "batch_size": len(y), "attack_steps": cfg.attack.num_steps, "images_per_s": round(images_per_s, 1),
        "step_ms": round(step_ms, 2), "attack_ms": round(attack_ms, 2), "attack_share": round(attack_ms / step_ms, 3),
        "gflop_per_image_step": round(flops / 1e9, 3), "tflops": round(tflops, 4),
        "peak_fraction": round(tflops / peak, 4) if peak else None, "perf": run.perf.summary(),
    }  # fmt: skip


def short_run_accuracy(cfg, epochs: int, out_dir: str) -> dict:
    from engine.train import run_training

    cfg = apply_overrides(cfg, [f"train.epochs={epochs}", "eval.attacks=clean,pgd20"])
    import json
    from pathlib import Path

    run = run_training(cfg, out_dir)
    results = json.loads((Path(run) / "results.json").read_text())["results"]
    return {"clean": results["clean"]["accuracy"], "pgd20": results["pgd20"]["accuracy"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet18", choices=["resnet18", "wrn34-10"])
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--attack-steps", type=int, default=10)
    p.add_argument("--steps", type=int, default=10, help="timed repetitions per row")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rows", default=",".join(str(i) for i in range(len(LADDER))), help="indices into the ladder")
    p.add_argument("--quick", action="store_true", help="ResNet-18 width 16, batch 64, PGD-5, no compile row")
    p.add_argument("--train-epochs", type=int, default=0, help="also train each row briefly and report accuracy")
    p.add_argument("--data-dir", default=None, help="real CIFAR-10 for --train-epochs (default: synthetic)")
    p.add_argument("--out", default="bench/results/train_step.jsonl")
    args = p.parse_args()
    if args.quick:
        args.width, args.batch_size, args.attack_steps, args.steps = 16, 64, 5, 5
        args.rows = "0,1,2,3,4"  # no cudnn.benchmark (CUDA only) or compile row
    base = [
        f"model.arch={args.arch}",
        f"model.width={args.width}",
        f"train.batch_size={args.batch_size}",
        f"attack.num_steps={args.attack_steps}",
        "attack.step_size=2/255",
        "data.dataset=synthetic",
        f"data.synthetic_size={args.batch_size}",
    ]
    if args.data_dir:
        base[-2:] = ["data.dataset=cifar10", f"data.data_dir={args.data_dir}", "data.train_subset=10000"]
    overrides, rows = list(base), []
    wanted = {int(i) for i in args.rows.split(",")}
    for i, (name, switches) in enumerate(LADDER):
        overrides += switches
        if i not in wanted:
            continue
        cfg = apply_overrides(get_recipe("demo"), overrides)
        row = measure(cfg, name, args.steps, args.warmup) | provenance()
        if args.train_epochs:
            row |= short_run_accuracy(cfg, args.train_epochs, f"bench/results/runs/train_step-{i}-{time.time():.0f}")
        rows.append(row)
        print(f"{name}: {row['images_per_s']} img/s, step {row['step_ms']} ms, attack {row['attack_ms']} ms")
    append_jsonl(args.out, rows)
    columns = ["config", "images_per_s", "step_ms", "attack_ms", "attack_share", "tflops", "peak_fraction"]
    print(markdown_table(rows, columns + (["clean", "pgd20"] if args.train_epochs else [])))


if __name__ == "__main__":
    main()
