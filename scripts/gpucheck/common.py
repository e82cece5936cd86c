"""What the torch stages share: sizes (full or CPU smoke), configs built like bench/train_step.py, step timing,
the cost model's figures, and the profiler summary (ops and kernels per step, GPU-busy fraction)."""

from __future__ import annotations

import contextlib
import json
import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch
from cost_model import derived, epoch_images, forward_units  # bench/ is on sys.path (scripts/gpu_check.py)
from train_step import (  # bench/ is on sys.path
    LADDER,
    aten_events,
    device_events,
    forward_flops,
    inside_aten,
    kernel_figures,
    ms_per_call,
    profiled,
)

from engine.config import TrainConfig, apply_overrides
from engine.methods.arat import attack_inputs
from engine.recipes import get_recipe
from engine.train import Run, train_step

from .record import SMOKE_SKIP, StageRecord

SMOKE_WIDTH, SMOKE_ATTACK_STEPS = 8, 2
SMOKE_BATCH = {128: 8, 512: 16}  # the check's two batch sizes, shrunk
DEFAULT_ROW = 4  # LADDER[4], "+fused kernels": the last eager row, the GPU default
ATTACK_CALLS = 5  # attack_ms: the mean of this many back-to-back attacks (~20-150 ms each on the H200)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(dev: torch.device | None = None) -> None:
    if (dev or device()).type == "cuda":
        torch.cuda.synchronize()


def shape_overrides(batch: int, smoke: bool, arch: str = "resnet18", attack_steps: int = 10) -> list[str]:
    """Network, batch and synthetic data sized to one batch, as bench/train_step.py's main() builds them."""
    batch = SMOKE_BATCH.get(batch, batch) if smoke else batch
    width = SMOKE_WIDTH if smoke else 64
    steps = SMOKE_ATTACK_STEPS if smoke else attack_steps
    return [
        f"model.arch={arch}",
        *([f"model.width={width}"] if arch == "resnet18" else []),
        f"train.batch_size={batch}",
        f"attack.num_steps={steps}",
        "attack.step_size=2/255",  # METHOD's PGD-10 step (the demo recipe's own is sized for PGD-3)
        "data.dataset=synthetic",
        f"data.synthetic_size={batch}",
    ]


def ladder_config(row: int, batch: int, smoke: bool, extra: list[str] = ()) -> TrainConfig:
    """bench/train_step.py's ladder row `row` (cumulative switches) on the demo recipe, plus `extra`."""
    overrides = shape_overrides(batch, smoke)
    for _, switches in LADDER[: row + 1]:
        overrides += switches
    return apply_overrides(get_recipe("demo"), overrides + list(extra))


def recipe_config(recipe: str, batch: int, smoke: bool, extra: list[str] = (), arch: str = "resnet18"):
    return apply_overrides(get_recipe(recipe), shape_overrides(batch, smoke, arch) + list(extra))


def first_batch(run: Run) -> tuple[torch.Tensor, torch.Tensor]:
    return next(iter(run.train_loader))


def reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def peak_mem_gib(dev: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if dev.type == "cuda" else None


def read_figures(record: StageRecord, stage: str) -> dict[str, Any]:
    """Another stage's figures from this work folder (e.g. the ceilings), {} when it has not run."""
    try:
        return json.loads((record.work / f"{stage}.json").read_text()).get("figures", {})
    except (OSError, ValueError):
        return {}


def ceiling_tflops(record: StageRecord) -> float | None:
    return read_figures(record, "ceilings").get("bf16_matmul_tflops")


def flops_per_image_step(run: Run, x: torch.Tensor, attack_steps: int) -> float:
    """METHOD 9: (2 x attack steps + 6) forward units F per image and step, F counted on the adv branch."""
    return forward_flops(run.nets.raw, x[: min(8, len(x))]) * forward_units(attack_steps)


def capture_stats(run: Run) -> dict[str, Any]:
    """{"cuda_graphs": captures, replays, attacks run uncaptured, ...} where the run graphs its attacks, else {}."""
    graphs = run.perf.attack_graphs
    return {} if graphs is None else {"cuda_graphs": graphs.stats()}


def capture_problem(row: dict[str, Any]) -> str | None:
    """A graphed row whose attacks were not all captured (a failed capture falls back to eager with one warning:
    its figures would be eager ones under a graphed name). A run that attacked nothing (standard training) is fine."""
    stats = row.get("cuda_graphs")
    if not stats or stats.get("attacks") == 0 or (stats["captures"] and not stats["eager_calls"]):
        return None
    return (f"attacks ran uncaptured ({stats['captures']} captures, {stats['eager_calls']} eager calls after warm-up, "
            f"broken={stats['broken']}; the stage log has the warning)")  # fmt: skip


def measure_steps(run: Run, record: StageRecord, warmup: int, steps: int) -> dict[str, Any]:
    """step_ms over back-to-back steps (after warm-ups), attack_ms, derived figures, peak memory, finite loss."""
    dev = run.perf.device
    x, y = first_batch(run)
    reset_peak(dev)
    for _ in range(max(warmup, 1)):
        train_step(run, x, y)
    last = {}
    step_ms = ms_per_call(lambda: last.update(train_step(run, x, y)), steps, dev)
    attack_ms = ms_per_call(lambda: attack_inputs(run.nets, x, y, run.cfg.attack, run.perf.autocast), ATTACK_CALLS, dev)
    loss = float(last["loss"])
    flops = flops_per_image_step(run, x, run.cfg.attack.num_steps)
    figures = derived(len(y) / (step_ms / 1e3), flops, ceiling_tflops(record), epoch_images(len(y)))
    return {
        "batch_size": len(y),
        "step_ms": round(step_ms, 2),
        "attack_ms": round(attack_ms, 2),
        **figures,
        "gflop_per_image_step": round(flops / 1e9, 3),
        "peak_mem_gib": peak_mem_gib(dev),
        "loss": loss,
        "finite_loss": math.isfinite(loss),
        "perf": run.perf.summary(),
        **capture_stats(run),
    }


def profile_steps(
    fn, steps: int, dev: torch.device, out_file: Path, title: str, step_ms: float | None = None
) -> dict[str, Any]:
    """Profile `steps` calls of fn: top-level aten ops (an op called inside another is not counted again) and CUDA
    kernels per step, GPU-busy fraction (kernel time / the unprofiled `step_ms` where given, else the profiled wall
    time, which the profiler's own cost lengthens; below 0.7 is launch-bound), aten::_to_copy per step (nested
    casts included); the top 40 kernels (CPU: ops) go to out_file."""
    events, wall_us = profiled(fn, dev, steps)
    aten = aten_events(events)
    result = {
        "aten_ops_per_step": round(sum(not inside_aten(e) for e in aten) / steps),
        "to_copy_per_step": round(sum(e.name == "aten::_to_copy" for e in aten) / steps),
        "wall_ms_per_step": round(wall_us / 1e3 / steps, 2),  # profiled
    }
    if dev.type == "cuda":
        result |= kernel_figures(events, wall_us, steps, step_ms)
    else:
        result |= {"kernels_per_step": SMOKE_SKIP, "launches_per_step": SMOKE_SKIP, "busy_fraction": SMOKE_SKIP}
    append_top_table(out_file, title, device_events(events) if dev.type == "cuda" else aten, steps, result)
    return result


def append_top_table(path: Path, title: str, events, steps: int, result: dict[str, Any]) -> None:
    """The 40 events with the most total time (kernels on CUDA, aten ops on CPU), per step."""
    total: dict[str, float] = defaultdict(float)
    count: Counter = Counter()
    for e in events:
        total[e.name] += e.time_range.elapsed_us()
        count[e.name] += 1
    lines = [f"== {title}", "   " + ", ".join(f"{k} {v}" for k, v in result.items())]
    lines.append(f"   {'us/step':>10} {'calls/step':>10}  name")
    for name, us in sorted(total.items(), key=lambda kv: -kv[1])[:40]:
        lines.append(f"   {us / steps:10.1f} {count[name] / steps:10.1f}  {name[:160]}")
    with path.open("a") as f:
        f.write("\n".join(lines) + "\n\n")


SMOKE_COMPILE_BACKEND = "eager"  # dynamo only: graphs, breaks, guards; no AOTAutograd/Inductor (minutes on CPU)


@contextlib.contextmanager
def smoke_compile(smoke: bool):
    """In --cpu-smoke, every torch.compile (the engine's included) defaults to a backend without code generation:
    graphs, breaks, guards and recompiles are still dynamo's, only Inductor's C++/Triton codegen is skipped."""
    if not smoke:
        yield
        return
    original = torch.compile

    def compile_without_codegen(model=None, **kwargs):
        kwargs["backend"] = SMOKE_COMPILE_BACKEND  # also over the engine's own perf.compile_backend (inductor)
        kwargs.pop("mode", None)  # mode only applies to Inductor
        return original(**kwargs) if model is None else original(model, **kwargs)

    torch.compile = compile_without_codegen
    try:
        yield
    finally:
        torch.compile = original
