"""Stage `methods`: every training objective and switch runs on the GPU (eager, B=128, ResNet-18 width 64; the
attack captured as a CUDA graph, the engine's CUDA default).

Each case: build_run, on_epoch_start, warm-up steps (3 with the attack graphed: its capture is not timed) and 3
timed steps; it records ok (or the traceback's last lines), a finite loss, step_ms and peak memory. WRN-34-10 AR-AT
runs one timed step (after the same warm-up) for its epoch projection. For fp16, the fraction of exactly-zero
input-gradient pixels is compared with bf16 and fp32 (the attack loss is scaled under fp16, so it should no longer
underflow).
"""

from __future__ import annotations

import gc
import math
import tempfile
from pathlib import Path
from typing import Any

import torch
from cost_model import derived, epoch_images  # bench/ is on sys.path (scripts/gpu_check.py)

from engine.attacks.pgd import frozen, input_gradient, mode
from engine.config import apply_overrides
from engine.models import build_model
from engine.train import build_run, train_step

from .common import (
    capture_problem,
    capture_stats,
    ceiling_tflops,
    first_batch,
    flops_per_image_step,
    ms_per_call,
    peak_mem_gib,
    recipe_config,
    reset_peak,
)
from .record import BUDGET_SKIP, SMOKE_SKIP, StageFailed, StageRecord, guarded

ARAT = "arat-resnet18-cifar10"
EAGER = ["perf.compile=off"]  # perf.compile=auto compiles on CUDA: minutes per case; the compile stage times that
CASES = [  # (name, recipe, overrides)
    ("arat", ARAT, ["perf.dual_forward=true", "perf.kernels=on"]),
    ("arat kernels=off", ARAT, ["perf.dual_forward=true", "perf.kernels=off"]),
    ("arat dual_forward=false", ARAT, ["perf.dual_forward=false", "perf.kernels=on"]),
    ("arat dual_forward=false kernels=off", ARAT, ["perf.dual_forward=false", "perf.kernels=off"]),
    ("arat fp16", ARAT, ["perf.dtype=fp16"]),
    ("arat grad_sim", ARAT, ["analysis.grad_sim=true"]),
    ("arat official_quirk", ARAT, ["attack.official_quirk=true"]),
    ("ablation-v0", "ablation-v0-resnet18-cifar10", []),
    *[(m, f"{m}-resnet18-cifar10", []) for m in ("at", "trades", "mart", "lbgat", "std")],
    ("arrest", "arrest-resnet18-cifar10", ["method.pretrain_epochs=0", "train.epochs=20"]),  # + an init: run_case
]
WARMUP, STEPS, SMOKE_WARMUP, SMOKE_STEPS = 1, 3, 0, 1
CASE_SECONDS, WRN_SECONDS = 2.0, 6.0
AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}


def zero_gradient_fractions(run, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """Fraction of exactly-zero pixels of the attack's input gradient (adv branch, train mode) per autocast dtype,
    and of pixels whose gradient is not finite (an overflow under fp16: the PGD step takes NaN as a zero step, so a
    NaN gradient would read as the best of zero fractions)."""
    model, dev = run.nets.attack, run.perf.device
    eps = run.cfg.attack.eps
    x_adv = (x + eps * (2 * torch.rand_like(x) - 1)).clamp(0, 1)
    fractions = {}
    for name, dtype in AUTOCAST.items():
        autocast = (lambda d=dtype: torch.autocast(dev.type, dtype=d)) if dtype is not None else None
        with mode(model, True), frozen(model):
            grad = input_gradient(model, x_adv, y, "adv", None, autocast)
        fractions[name] = round((grad == 0).float().mean().item(), 6)
        fractions[f"{name}_not_finite"] = round((~torch.isfinite(grad)).float().mean().item(), 6)
    return fractions


def warmup_steps(run) -> int:
    """Untimed steps before the clock starts: WARMUP, or, with the attack graphed, enough for it to be captured
    (its warm-up calls run eagerly, the next one checks for host syncs and captures), so replays are timed."""
    graphs = run.perf.attack_graphs
    return WARMUP if graphs is None else max(WARMUP, graphs.warmup + 1)


def run_case(record: StageRecord, name: str, recipe: str, overrides: list[str]) -> dict[str, Any]:
    arch = "wrn34-10" if "wrn34-10" in recipe else "resnet18"
    cfg = recipe_config(recipe, 128, record.smoke, [*EAGER, *overrides], arch=arch)
    if cfg.method.name != "arrest":
        run = build_run(cfg)
    else:  # its fine-tuning step, timed on a fresh network's weights as the standard-trained one
        with tempfile.TemporaryDirectory() as folder:  # not the check's output folder: its files come back
            run = build_run(apply_overrides(cfg, [f"method.init={fresh_init(Path(folder), cfg)}"]))
    x, y = first_batch(run)
    dev = run.perf.device
    reset_peak(dev)
    extra = run.method.on_epoch_start(run.nets, [(x, y)], run.perf.autocast, 1)
    for _ in range(SMOKE_WARMUP if record.smoke else warmup_steps(run)):
        train_step(run, x, y)
    last: dict = {}
    step_ms = ms_per_call(lambda: last.update(train_step(run, x, y)), SMOKE_STEPS if record.smoke else STEPS, dev)
    loss = float(last["loss"])
    logged = {k: v for k, v in extra.items() if isinstance(v, (int, float))}
    row = {"case": name, "recipe": recipe, "overrides": overrides, "ok": math.isfinite(loss), "loss": loss,
           "finite_loss": math.isfinite(loss), "step_ms": round(step_ms, 2), "peak_mem_gib": peak_mem_gib(dev),
           "epoch_start": logged, "perf": run.perf.summary()} | captured(run)  # fmt: skip
    if name == "arat fp16":
        row["zero_grad_fraction"] = zero_gradient_fractions(run, x, y)
        record.figure("zero_grad_fraction", row["zero_grad_fraction"])
    return record.row(row)


def fresh_init(folder: Path, cfg) -> Path:
    """A freshly built plain network of `cfg`'s shape, saved in `folder` for ARREST's method.init: ARREST refuses to
    fine-tune without a standard-trained network, and a step's cost does not depend on what the teacher learned."""
    path = folder / "arrest_init.pt"
    net = build_model(cfg.model, cfg.data.num_classes, split_bn=False)
    torch.save(net.state_dict(), path)
    return path


def captured(run) -> dict[str, Any]:
    """The run's captured-attack counts for its row; a case whose attacks ran uncaptured fails (not ok)."""
    stats = capture_stats(run)
    problem = capture_problem(stats)
    return stats | ({"ok": False, "error": problem} if problem else {})


def wrn_case(record: StageRecord) -> dict[str, Any]:
    """WRN-34-10 AR-AT: one timed step (after the warm-up) projected to an epoch and a 100-epoch run."""
    run = build_run(recipe_config("arat-wrn34-10-cifar10", 128, record.smoke, EAGER, arch="wrn34-10"))
    x, y = first_batch(run)
    flops = flops_per_image_step(run, x, run.cfg.attack.num_steps)
    row = {"case": "wrn34-10 arat", "gflop_per_image_step": round(flops / 1e9, 2), "ok": True}
    if record.smoke:
        return record.row(row | {"step": SMOKE_SKIP})
    reset_peak(run.perf.device)
    for _ in range(warmup_steps(run)):
        train_step(run, x, y)
    last: dict = {}
    step_ms = ms_per_call(lambda: last.update(train_step(run, x, y)), 1, run.perf.device)
    loss = float(last["loss"])
    row |= {"step_ms": round(step_ms, 1), "loss": loss, "ok": math.isfinite(loss), "finite_loss": math.isfinite(loss)}
    row |= derived(len(y) / (step_ms / 1e3), flops, ceiling_tflops(record), epoch_images(len(y)))
    row["peak_mem_gib"] = peak_mem_gib(run.perf.device)
    row |= captured(run)
    record.figure("wrn34_10", {k: row.get(k) for k in ("images_per_s", "tflops", "pct_989", "pct_ceiling", "epoch_s",
                  "run100_min", "step_ms", "peak_mem_gib")})  # fmt: skip
    return record.row(row)


def count(record: StageRecord, results: list[dict[str, Any]], skipped: int) -> list[str]:
    """ok / failed / skipped / total, written after every case: a stage cut at its cap keeps them."""
    failed = [r["case"] for r in results if not r.get("ok")]
    record.data["figures"] |= {"ok": len(results) - len(failed), "skipped": skipped, "total": len(CASES) + 1}
    record.figure("failed", failed)
    return failed


def methods(record: StageRecord) -> None:
    """The main AR-AT case, then WRN-34-10 (its projection is a headline), then every other case."""
    results: list[dict[str, Any]] = []
    skipped = 0
    count(record, results, skipped)
    for name, recipe, overrides in CASES[:1] + [("wrn34-10 arat", None, None)] + CASES[1:]:
        kind = "wrn" if recipe is None else "resnet18"
        if not record.has_time_for(kind, WRN_SECONDS if recipe is None else CASE_SECONDS):
            record.row({"case": name, "status": BUDGET_SKIP})
            skipped += 1
            count(record, results, skipped)
            continue
        with record.timed_case(kind):
            if recipe is None:
                results.append(guarded(record, name, wrn_case, record))
            else:
                results.append(guarded(record, name, run_case, record, name, recipe, overrides))
        count(record, results, skipped)
        gc.collect()  # the finished case's run (model, optimizer, captured graphs) is garbage only after a collect
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    failed = count(record, results, skipped)
    if failed:
        raise StageFailed(f"{len(failed)} of {len(CASES) + 1} cases failed: {', '.join(failed)}")
