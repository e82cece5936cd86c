"""Stage `step_eager`: the AR-AT ResNet-18 step along bench/train_step.py's ladder, at B=128 and B=512.

First row 4 with cudnn.benchmark on (the headline figures), then that row with the attack captured as a CUDA graph
(perf.cuda_graphs, the engine's CUDA default), then rows 0-4 with cudnn.benchmark off (as the ladder was measured).
The two headline rows and row 3 at B=128 are profiled: aten ops and CUDA kernels per step, the host's kernel and
graph launches per step and the GPU-busy fraction (they show what the capture saved; the kernels the GPU executes
stay as many), and aten::_to_copy per step. After the B=128 rows, ResNet-18's convolutions alone at B=128 (fp32
and bf16): how far the steps are from what their convolutions reach.
"""

from __future__ import annotations

import gc
from typing import Any

import torch
from train_step import LADDER, conv_ceiling

from engine.train import build_run, train_step

from .common import DEFAULT_ROW, capture_problem, device, first_batch, ladder_config, measure_steps, profile_steps
from .record import BUDGET_SKIP, StageFailed, StageRecord, guarded, profile_or_error

CUDNN_OFF, CUDNN_ON = "perf.cudnn_benchmark=off", "perf.cudnn_benchmark=on"
# (batch, ladder row, cudnn.benchmark, profile)
GRAPHS_ROW = next(i for i, (name, _) in enumerate(LADDER) if name == "+CUDA graphs")  # on top of cudnn.benchmark
# the headline rows first (the engine's CUDA defaults, captured and uncaptured; profiled: their busy fractions):
# last among the B=128 rows they were skipped for the cap on the H200 (41 s of 45 went to rows 0-4). The captured
# one leads: real_run plans its epochs from it, and the first row also pays the process's cold start (Triton's JIT
# of the fused kernels, ~24 s on the H200 without the kernel stages before it), which could leave a second no time
ROWS = [(128, GRAPHS_ROW, True, True), (128, DEFAULT_ROW, True, True)]
ROWS += [(128, row, False, row == 3) for row in range(DEFAULT_ROW + 1)]
ROWS += [(512, 3, False, False), (512, DEFAULT_ROW, False, False)]
ROWS += [(512, DEFAULT_ROW, True, True)]
SMOKE_ROWS = [r for r in ROWS if (r[0] == 128 or r[3]) and r[1] != GRAPHS_ROW]  # CUDA graphs: CUDA only
WARMUP, STEPS, SMOKE_WARMUP, SMOKE_STEPS = 3, 20, 1, 2
PROFILE_STEPS = 2
ROW_SECONDS = {128: 4.0, 512: 8.0}
PROFILE_SECONDS = 8.0  # a profiled row's extra: the profiler's start-up, its steps and the trace's export
CONV_SECONDS = 6.0  # the network's convolutions alone, fp32 and bf16 (20 of them, one model built, no training)


def release_memory() -> None:
    """Free the last row's network and optimizer before the next row measures its own peak memory."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def profile_row(run, title: str, record: StageRecord, step_ms: float) -> dict[str, Any]:
    x, y = first_batch(run)
    out_file = record.side_file("profile_eager.txt")
    return profile_steps(lambda: train_step(run, x, y), PROFILE_STEPS, run.perf.device, out_file, title, step_ms)


def step_row(record: StageRecord, batch: int, row: int, cudnn: bool, profile: bool) -> dict[str, Any]:
    name = LADDER[row][0] + (" +cudnn.benchmark" if cudnn and row <= DEFAULT_ROW else "")
    cfg = ladder_config(row, batch, record.smoke, [CUDNN_ON if cudnn else CUDNN_OFF])
    run = build_run(cfg)
    warmup, steps = (SMOKE_WARMUP, SMOKE_STEPS) if record.smoke else (WARMUP, STEPS)
    if not record.smoke and run.perf.attack_graphs is not None:  # its capture before the clock, whatever its warm-up
        warmup = max(warmup, run.perf.attack_graphs.warmup + 1)
    result = {"row": row, "config": name, "cudnn_benchmark": cudnn, **measure_steps(run, record, warmup, steps)}
    if profile:
        result |= profile_or_error(profile_row, run, f"{name}, B={result['batch_size']}", record, result["step_ms"])
    return result


def recorded_row(record: StageRecord, batch: int, row: int, cudnn: bool, profile: bool) -> dict[str, Any]:
    return record.row({"nominal_batch": batch, **step_row(record, batch, row, cudnn, profile)})


def headline(row: dict[str, Any], busy: float | str | None) -> dict[str, Any]:
    keys = ("images_per_s", "tflops", "pct_989", "pct_ceiling", "epoch_s", "run100_min", "step_ms", "peak_mem_gib")
    return {k: row.get(k) for k in keys} | {"busy_fraction": busy, "config": row["config"]}


def cudnn_gain(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """img/s of row 4 without and with cudnn.benchmark, per batch size."""
    gain = {}
    for batch in (128, 512):
        pair = {r["cudnn_benchmark"]: r["images_per_s"] for r in rows if r["nominal_batch"] == batch and
                r["row"] == DEFAULT_ROW}  # fmt: skip
        if len(pair) == 2:
            gain[str(batch)] = {"off": pair[False], "on": pair[True], "gain_pct": round(100 * (pair[True] / pair[False]
                                - 1), 1)}  # fmt: skip
    return gain


def step_eager(record: StageRecord) -> None:
    """The B=128 rows settle the stage (a finite loss each); the B=512 rows are extras: a cut there leaves it ok."""
    rows: list[dict[str, Any]] = []
    busy: dict[int, Any] = {}
    record.side_file("profile_eager.txt").unlink(missing_ok=True)
    plan = SMOKE_ROWS if record.smoke else ROWS
    for case in (c for c in plan if c[0] == 128):
        step_case(record, case, rows, busy)
    with record.optional("convolutions alone"):
        conv_case(record)
    with record.optional("B=512 rows"):
        for case in (c for c in plan if c[0] != 128):
            step_case(record, case, rows, busy)
    if record.failed:
        raise StageFailed(record.data["error"])


def conv_case(record: StageRecord) -> None:
    """ResNet-18's convolutions alone at B=128, forward and back to the input, fp32 and bf16 (bench/train_step.py's
    conv_ceiling): the TFLOP/s a step of each dtype could reach if nothing but its convolutions ran. A headline row's
    TFLOP/s over it is how much of its step goes to its convolutions; the rest (batch norm, activations, launches,
    the optimizer) is what fusing and capturing can win. Extra: a cut or a skip leaves the stage as it was."""
    if not record.has_time_for("conv", CONV_SECONDS):
        record.row({"case": "convolutions alone", "status": BUDGET_SKIP})
        return
    cfg = ladder_config(0, 128, record.smoke)
    with record.timed_case("conv"):
        result = guarded(record, "convolutions alone", conv_ceiling, cfg, device())
    release_memory()  # its graphs' pools, before the B=512 rows measure their peak memory
    if result.get("ok") is False:
        return  # (guarded wrote its row)
    record.row({"case": "convolutions alone", "batch_size": cfg.batch_size, **result})
    record.figure("conv_ceiling", result)


def step_case(record: StageRecord, case: tuple, rows: list[dict[str, Any]], busy: dict[int, Any]) -> None:
    """One ladder row, then the stage's figures again (a stage cut at its cap keeps them)."""
    batch, row, cudnn, profile = case
    kind = f"B={batch}" + (" profiled" if profile else "")  # a profiled row's time does not size the plain ones
    if not record.has_time_for(kind, ROW_SECONDS[batch] + (PROFILE_SECONDS if profile else 0.0)):
        record.row({"row": row, "nominal_batch": batch, "cudnn_benchmark": cudnn, "status": BUDGET_SKIP})
        return
    # one row's fault (a capture, the profiler) becomes a failing row and must not hide the others
    with record.timed_case(kind):
        result = guarded(record, f"{LADDER[row][0]} B={batch}", recorded_row, record, batch, row, cudnn, profile)
    release_memory()
    if result.get("ok") is False:
        record.fail(f"{result['case']}: {result['error']}")
        return
    rows.append(result)
    if profile and row == DEFAULT_ROW:
        busy[batch] = result.get("busy_fraction")
    if row == DEFAULT_ROW and cudnn:
        record.figure(f"b{batch}", headline(result, busy.get(batch, busy.get(128))))
    if row == GRAPHS_ROW:
        record.figure(f"b{batch}_cuda_graphs", headline(result, result.get("busy_fraction")))
    if not result["finite_loss"]:
        record.fail(f"{result['config']} B={batch}: loss {result['loss']}")
    if problem := capture_problem(result):
        record.fail(f"{result['config']} B={batch}: {problem}")
    record.figure("cudnn_benchmark", cudnn_gain(rows))
    profiled = [r for r in rows if "aten_ops_per_step" in r]
    keys = ("config", "nominal_batch", "aten_ops_per_step", "kernels_per_step", "launches_per_step",
            "graph_launches_per_step", "busy_fraction", "to_copy_per_step")  # fmt: skip
    record.figure("profile", [{k: r.get(k) for k in keys} for r in profiled])
