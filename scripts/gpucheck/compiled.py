"""Stage `compile`: AR-AT ResNet-18 at B=128 with perf.compile=true and kernels=on (no CPU test covers the pair).

1. the first step's time is `compile_s`; then 2 warm-ups and one on_epoch_start (the third graph);
2. unique graphs, graph breaks, cache entries on forward.__code__, dynamic dims;
3. with torch._dynamo.config.error_on_recompile, 20 timed steps and another on_epoch_start: recompiles after warm-up;
4. a profile (profile_compiled.txt) and the layouts the dual-BN op received.
The `defaults` extra below is profiled too (appended to profile_compiled.txt: its GPU-busy fraction says whether
the step `arat train` runs waits on the host or on the GPU).
Optional, while time for one more cold compile remains (>= 70 s), in this order: the engine's defaults (`defaults`:
the AR-AT ResNet-18 recipe with no perf override, what `arat train` runs on the device), the engine's CUDA graphs of
the attack (perf.cuda_graphs=on), TRADES, mode="reduce-overhead" (Inductor's CUDA graphs) as attack and train net,
kernels=off, and the kernels as opaque custom ops (`opaque_kernels`: the triton_op route closed, so Inductor cannot
see the launches). A cut at the cap during these leaves the stage ok (its criteria are settled before them).
TORCH_LOGS output (recompiles, graph breaks, dynamic shapes, perf hints) goes to compile_torch_logs.txt.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch._dynamo
from cost_model import derived, epoch_images  # bench/ is on sys.path (scripts/gpu_check.py)
from torch._dynamo.utils import counters

from engine.methods import Nets
from engine.perf import dynamo_counts
from engine.train import Run, build_run, train_step

from .common import (
    DEFAULT_ROW,
    capture_problem,
    capture_stats,
    ceiling_tflops,
    first_batch,
    flops_per_image_step,
    ladder_config,
    ms_per_call,
    peak_mem_gib,
    profile_steps,
    recipe_config,
    reset_peak,
    smoke_compile,
    sync,
)
from .record import BUDGET_SKIP, SMOKE_SKIP, StageFailed, StageRecord, error_line, guarded, profile_or_error

COMPILED = ["perf.compile=true", "perf.kernels=on"]
WARMUP, STEPS, SMOKE_STEPS = 2, 20, 2
EXTRA_STEPS = 10
EXTRAS_NEED_S = 70.0
CACHED_EXTRAS, CACHED_EXTRA_S = ("defaults", "cuda_graphs"), 25.0  # extras whose graphs the main case compiled
DEFAULTS_RECIPE = "arat-resnet18-cifar10"
SYMBOL = re.compile(r"create_symbol (\w+) = (\S+) for (\S+)")


def timed_first_step(run: Run, x, y) -> tuple[float, dict]:
    sync(run.perf.device)
    start = time.perf_counter()
    out = train_step(run, x, y)
    sync(run.perf.device)
    return time.perf_counter() - start, out


def epoch_start(run: Run, x, y) -> None:
    """The method's epoch-start hook (AR-AT: the clean branch in eval mode, a graph of its own)."""
    run.method.on_epoch_start(run.nets, [(x, y)], run.perf.autocast, 1)


def cache_entries(model: torch.nn.Module) -> dict[str, Any]:
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    entries = {}
    for name, fn in (("forward", type(model).forward), ("_call_impl", torch.nn.Module._call_impl)):
        try:
            entries[name] = len(_debug_get_cache_entry_list(fn.__code__))
        except Exception as exc:  # noqa: BLE001 - a private API: record why it is missing
            entries[name] = error_line(exc)
    return entries


def dynamic_dims(record: StageRecord) -> dict[str, Any]:
    """The symbols dynamo created, from the torch logs: dynamic tensor dims (size/stride), and a count of scalar
    symbols (e.g. from .item())."""
    dims, scalars = [], 0
    for line in torch_log_lines(record):
        match = SYMBOL.search(line)
        if match and ("size()" in match[3] or "stride()" in match[3]):
            dims.append(f"{match[1]}={match[2]} {match[3]}")
        elif match:
            scalars += 1
    return {"dynamic_dims": sorted(set(dims))[:20], "scalar_symbols": scalars}


def torch_log_lines(record: StageRecord) -> list[str]:
    path = record.side_file("compile_torch_logs.txt")
    return path.read_text(errors="replace").splitlines() if path.is_file() else []


def graph_figures(run: Run) -> dict[str, Any]:
    made = dynamo_counts()  # eager_frames: functions dynamo gave up on (they ran uncompiled)
    return {
        "unique_graphs": made["graphs"],
        "graph_breaks": made["graph_breaks"],
        "eager_frames": made["eager_frames"],
        "graph_break_reasons": [str(k)[:200] for k in list(counters["graph_break"])[:10]],
        "cache_entries": cache_entries(run.nets.raw),
    }


def count_recompiles(run: Run, x, y, steps: int) -> tuple[int, str | None, float]:
    """Steps and an epoch start under error_on_recompile: (recompiles, the error, ms per step)."""
    before = counters["stats"]["unique_graphs"]
    torch._dynamo.config.error_on_recompile = True
    try:
        step_ms = ms_per_call(lambda: train_step(run, x, y), steps, run.perf.device)
        epoch_start(run, x, y)
        return counters["stats"]["unique_graphs"] - before, None, step_ms
    except torch._dynamo.exc.RecompileError as exc:  # the finding; any other error is the main case's failure
        return max(1, counters["stats"]["unique_graphs"] - before), error_line(exc), math.nan
    finally:
        torch._dynamo.config.error_on_recompile = False


def dual_bn_layouts(fn) -> Counter:
    """Which (shape, layout, dtype) the Triton dual-BN kernels received while fn ran (wraps triton_impl.plan)."""
    from kernels._layout import layout_4d
    from kernels.dual_bn import triton_impl

    seen: Counter = Counter()
    original = triton_impl.plan

    def plan(x):
        seen[f"{tuple(x.shape)} {layout_4d(x)} {str(x.dtype).removeprefix('torch.')}"] += 1
        return original(x)

    triton_impl.plan = plan
    try:
        fn()
    finally:
        triton_impl.plan = original
    return seen


def loss_of(out: dict) -> float:
    return float(out["loss"])


def write_notes(record: StageRecord, lines: list[str]) -> None:
    with record.side_file("compile_notes.txt").open("a") as f:
        f.write("\n".join(lines) + "\n")


def profile_with_layouts(record: StageRecord, run: Run, x, y, step_ms: float) -> tuple[dict[str, Any], Counter]:
    """Step 4: two profiled steps (profile_compiled.txt) and the dual-BN layouts they used (compile_notes.txt)."""
    title = f"compiled, kernels on, B={len(y)}"
    profile: dict[str, Any] = {}
    out_file = record.side_file("profile_compiled.txt")
    step = lambda: train_step(run, x, y)  # noqa: E731
    busy_of = step_ms if math.isfinite(step_ms) else None  # the unprofiled step time
    layouts = dual_bn_layouts(lambda: profile.update(profile_steps(step, 2, run.perf.device, out_file, title, busy_of)))
    if layouts:
        write_notes(record, [f"dual_bn layout {key}: {n} calls in 2 profiled steps" for key, n in layouts.items()])
    return profile, layouts


def main_case(record: StageRecord) -> dict[str, Any]:
    """Steps 1-4 on the main configuration; returns its row (also written)."""
    run = build_run(ladder_config(DEFAULT_ROW, 128, record.smoke, COMPILED))
    x, y = first_batch(run)
    reset_peak(run.perf.device)
    first: dict[str, float] = {}
    record.figure("main_phase", "first step (compiling)")
    record.on_timeout = partial(note_cut, record, run, time.perf_counter())
    # Through the kernels' triton_op route, Inductor launches them from its own code: triton_impl.plan runs only
    # while a graph is traced, so the layouts are caught here, in the compiling step, not in the profiled ones.
    traced = dual_bn_layouts(lambda: first.update(compile_s=timed_first_step(run, x, y)[0]))
    compile_s = first["compile_s"]
    record.figure("compile_s", round(compile_s, 1))
    record.figure("main_phase", "warm-up steps and the epoch start (their graphs)")
    for _ in range(WARMUP):
        train_step(run, x, y)
    epoch_start(run, x, y)
    for key, value in graph_figures(run).items():
        record.figure(key, value)
    for key, value in dynamic_dims(record).items():
        record.figure(key, value)
    record.figure("main_phase", "counting recompiles")
    recompiles, recompile_error, step_ms = count_recompiles(run, x, y, SMOKE_STEPS if record.smoke else STEPS)
    record.figure("recompiles_after_warmup", recompiles)
    record.figure("recompile_error", recompile_error)
    record.figure("main_phase", "profile")
    profile, layouts = profile_with_layouts(record, run, x, y, step_ms)
    loss = loss_of(train_step(run, x, y))
    flops = flops_per_image_step(run, x, run.cfg.attack.num_steps)
    images_per_s = len(y) / (step_ms / 1e3)
    speed = derived(images_per_s, flops, ceiling_tflops(record), epoch_images(len(y))) if math.isfinite(step_ms) else {}
    row = {
        "case": "main",
        "config": "row 4 + compile, kernels on",
        "batch_size": len(y),
        "compile_s": round(compile_s, 1),
        "step_ms": round(step_ms, 2),
        **speed,
        "peak_mem_gib": peak_mem_gib(run.perf.device),
        "loss": loss,
        "finite_loss": math.isfinite(loss),
        "recompiles_after_warmup": recompiles,
        **profile,
        "dual_bn_layouts": dict(layouts)
        or {f"traced: {key}": n for key, n in traced.items()}
        or (
            "none (the Triton kernels did not run: CPU reference path)"
            if run.perf.device.type != "cuda"
            else "none traced in this process (graphs loaded from a warm cache?)"
        ),
        "perf": run.perf.summary(),
    }
    record.figure("main_phase", "done")
    return record.row(row)


def headline(row: dict[str, Any]) -> dict[str, Any]:
    keys = ("images_per_s", "tflops", "pct_989", "pct_ceiling", "epoch_s", "run100_min", "step_ms", "peak_mem_gib")
    return {k: row.get(k) for k in keys} | {"busy_fraction": row.get("busy_fraction")}


def extra_run(record: StageRecord, name: str) -> tuple[Run, Any]:
    """The run of an extra case, and its step function."""
    if name == "kernels=off":
        return build_run(ladder_config(DEFAULT_ROW, 128, record.smoke, ["perf.compile=true", "perf.kernels=off"])), None
    if name == "kernels=off+graphs":  # issue 9 item 3 on the CUDA default path: is Inductor's own code better there?
        overrides = ["perf.compile=true", "perf.kernels=off", "perf.cuda_graphs=on"]
        return build_run(ladder_config(DEFAULT_ROW, 128, record.smoke, overrides)), None
    if name == "opaque_kernels":  # the main case's switches; extra_case closes the triton_op route around it
        return build_run(ladder_config(DEFAULT_ROW, 128, record.smoke, COMPILED)), None
    if name == "cuda_graphs":
        return build_run(ladder_config(DEFAULT_ROW, 128, record.smoke, COMPILED + ["perf.cuda_graphs=on"])), None
    if name == "defaults":  # what `arat train` does: every perf switch at its default (cudnn.benchmark on CUDA too)
        return build_run(recipe_config(DEFAULTS_RECIPE, 128, record.smoke)), None
    if name == "trades":
        return build_run(recipe_config("trades-resnet18-cifar10", 128, record.smoke, COMPILED)), None
    run = build_run(ladder_config(DEFAULT_ROW, 128, record.smoke, ["perf.kernels=on"]))
    graphed = torch.compile(run.nets.raw, mode="reduce-overhead", dynamic=False)
    run.nets = Nets(train=graphed, attack=graphed, raw=run.nets.raw)
    return run, torch.compiler.cudagraph_mark_step_begin


@contextlib.contextmanager
def triton_op_route(open_: bool):
    """The kernels' triton_op route (compiled Triton on CUDA, visible to Inductor) open, or closed (the opaque
    custom ops, what the engine compiled before the route existed)."""
    from kernels import _dispatch

    saved = _dispatch.TRACED_TRITON_DEVICES
    _dispatch.TRACED_TRITON_DEVICES = saved if open_ else ()
    try:
        yield
    finally:
        _dispatch.TRACED_TRITON_DEVICES = saved


def extra_case(record: StageRecord, name: str) -> dict[str, Any]:
    with triton_op_route(name != "opaque_kernels"):
        return _extra_case(record, name)


def _extra_case(record: StageRecord, name: str) -> dict[str, Any]:
    torch._dynamo.reset()  # fresh caches: this case's graphs only (reset leaves dynamo's counters as they are)
    counters.clear()
    run, step_begin = extra_run(record, name)
    x, y = first_batch(run)

    def step():
        if step_begin is not None:
            step_begin()
        return train_step(run, x, y)

    start = time.perf_counter()
    step()
    sync(run.perf.device)
    compile_s = time.perf_counter() - start
    for _ in range(WARMUP):
        step()
    step_ms = ms_per_call(step, SMOKE_STEPS if record.smoke else EXTRA_STEPS, run.perf.device)
    loss = loss_of(step())
    profile: dict[str, Any] = {}
    if name == "defaults":  # what `arat train` runs (compiled, attack captured): is its GPU busy, and with what
        title = f"defaults (compiled, attack captured), B={len(y)}"
        out_file = record.side_file("profile_compiled.txt")
        profile = profile_or_error(profile_steps, step, 2, run.perf.device, out_file, title, step_ms)
    skips = [line.strip()[-300:] for line in torch_log_lines(record) if "skipping cudagraphs" in line]
    made = dynamo_counts()
    return record.row(profile | {
        "case": name, "batch_size": len(y), "compile_s": round(compile_s, 1), "step_ms": round(step_ms, 2),
        "images_per_s": round(len(y) / (step_ms / 1e3), 1), "loss": loss, "finite_loss": math.isfinite(loss),
        "unique_graphs": made["graphs"], "graph_breaks": made["graph_breaks"],
        "cudagraph_skips": skips[-5:], "perf": run.perf.summary(), **capture_stats(run),
    })  # fmt: skip


def note_cut(record: StageRecord, run: Run, started: float) -> None:
    """At the stage's cap inside the main case: how long its first step had been compiling when it never ended (a
    lower bound on compile_s), and the graphs built so far."""
    figures = record.data["figures"]
    if "compile_s" not in figures:
        figures["compile_s_at_least"] = round(time.perf_counter() - started, 1)
    if "unique_graphs" not in figures:
        figures |= graph_figures(run)


def extra_seconds(record: StageRecord, name: str) -> float:
    """Time an extra case needs: its own cold compile (about the main case's) and its steps, at least 70 s; the
    cases that compile the main case's graphs (`defaults`, `cuda_graphs`: Inductor's cache has them once the main
    case compiled; the H200's warm `cuda_graphs` case compiled in 5.2 s) about 25 s. After a cold main case (56 s
    on the H200) the 70 s rule left every extra skipped, `defaults` (what `arat train` runs) included."""
    if record.smoke:
        return 20.0
    compile_s = record.data["figures"].get("compile_s")
    if not isinstance(compile_s, int | float):
        return EXTRAS_NEED_S
    return CACHED_EXTRA_S if name in CACHED_EXTRAS else max(EXTRAS_NEED_S, 1.3 * compile_s + 10)


def extras(record: StageRecord) -> None:
    """The optional cases, each under record.optional: one cut at the stage's cap leaves the stage ok."""
    # kernels=off and opaque_kernels last: the H200 settled them on the uncaptured step (0.598x, 0.592x on
    # 2026-12-04, docs/kernels.md); kernels=off+graphs asks the same with the attack captured, as `arat train` runs
    names = ("defaults", "cuda_graphs", "kernels=off+graphs", "trades", "reduce-overhead", "kernels=off",
             "opaque_kernels")  # fmt: skip
    for name in [n for n in names if n not in ("kernels=off", "opaque_kernels")] if record.smoke else names:
        if name in ("cuda_graphs", "kernels=off+graphs", "reduce-overhead") and not torch.cuda.is_available():
            record.row({"case": name, "status": SMOKE_SKIP})
        elif not record.has_time(extra_seconds(record, name)):
            record.row({"case": name, "status": BUDGET_SKIP})
        else:
            with record.optional(f"extra case {name}"):
                row = guarded(record, name, extra_case, record, name)
            if row.get("ok") is False or not row.get("finite_loss", True):
                record.data["figures"].setdefault("extra_problems", []).append(f"{name}: {row.get('error', 'loss')}")
            elif problem := capture_problem(row):
                record.data["figures"].setdefault("extra_problems", []).append(f"{name}: {problem}")
            if name == "defaults" and "step_ms" in row:
                keys = (
                    "step_ms",
                    "images_per_s",
                    "busy_fraction",
                    "kernels_per_step",
                    "launches_per_step",
                    "graph_launches_per_step",
                    "cuda_graphs",
                )  # host launches; whether the attacks were captured
                record.figure("defaults", {k: row.get(k) for k in keys})
            record.figure("speed_vs_main", speed_vs_main(record.data["rows"]))


def speed_vs_main(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Each extra case's speed relative to the main case (compiled, kernels on through their triton_ops): > 1 is
    faster. `kernels=off` > 1 means Inductor's own fusion beats the Triton kernels under compile (issue 9 item 3:
    then perf.kernels should default to off under compile); `opaque_kernels` > 1 means the triton_op route is slower
    than opaque custom ops; `cuda_graphs` is the engine's captured attack on top of compile; `kernels=off+graphs`
    above `cuda_graphs` means Inductor's own code wins once the attack is captured; `defaults` is what `arat train`
    runs (on CUDA: compiled, kernels fused, attack captured, cudnn.benchmark)."""
    ms = {r["case"]: r.get("step_ms") for r in rows if r.get("case") and isinstance(r.get("step_ms"), int | float)}
    main = ms.pop("main", None)
    return {case: round(main / v, 3) for case, v in ms.items() if main and v} if main else {}


CACHE_MARKER = "arat_compile_stage_ran"


def compile_marker() -> Path:
    """A file in Inductor's cache folder (it also holds AOTAutograd's), written once the main case has compiled."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()) / CACHE_MARKER


def compile_cache_state() -> str:
    """'warm' when an earlier compile stage filled the cache folder: a rerun with the same $GPU_CHECK_WORK loads
    compiled graphs from it, so its compile_s is not a cold compile's. Other stages' entries (kernels_speed compiles
    too) do not hold the main case's graphs, so they leave it 'cold'."""
    return "warm" if compile_marker().is_file() else "cold"


def mark_compiled() -> None:
    marker = compile_marker()
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()


def compile_stage(record: StageRecord) -> None:
    for name in ("profile_compiled.txt", "compile_notes.txt"):
        record.side_file(name).unlink(missing_ok=True)
    # the extras compile the same forward again; never fall back silently (recompile_limit from torch 2.7, aliased)
    torch._dynamo.config.cache_size_limit = 64
    record.figure("compile_cache", compile_cache_state())
    with smoke_compile(record.smoke):
        row = guarded(record, "main", main_case, record)  # a failing main case still leaves the extras' figures
        record.on_timeout = None  # main_phase stays where a failing main case stopped
        if row.get("ok") is False:
            record.fail(f"main case (compiled, kernels on): {row['error']}")
        else:
            record.figure("b128", headline(row))
            mark_compiled()
        if row.get("finite_loss") is False:  # the pass criteria are settled before the optional extras start
            record.fail(f"loss {row['loss']} after compile")
        if row.get("recompiles_after_warmup"):
            error = record.data["figures"]["recompile_error"]
            record.fail(f"{row['recompiles_after_warmup']} recompiles after warm-up: {error}")
        extras(record)
    record.figure("speed_vs_main", speed_vs_main(record.data["rows"]))
    if record.failed:
        raise StageFailed(record.data["error"])
