"""Stage `kernels_speed` (figures only): the fused ops against eager and Inductor, per case

    gpu_us    triton.testing.do_bench, median: CUDA events around one call, L2 flushed before it. Not pure GPU
              time: an op of several launches (the dual BN: 3 forward, more backward, with Python between them)
              leaves the GPU idle while the host launches, so at the training sizes this is mostly launch cost
    graph_us  triton.testing.do_bench_cudagraph, median: back-to-back replays of a captured call, the GPU time
              without launch gaps (L2 not flushed: shapes that fit in L2 read from it)
    wall_us   200 back-to-back calls plus one sync: what the CPU's launches cost

with GB/s from the byte counts of bench/kernels_bench.py, also as % of the measured copy ceiling, from graph_us
where it was measured (`gb_s_from` names the column; `cold_gb_s`: from gpu_us). The H200's first run (2026-12-04)
computed GB/s from gpu_us: the dual BN's 2048x64x32x32 forward read 1.18 TB/s there and 2.75 TB/s from its graph
time. Rows run in priority order; Inductor rows (a compile each) only while the cap leaves time for them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch._dynamo
import triton.testing
from kernels_bench import _dual_bn_call  # bench/: the same forward / forward+backward closures

import kernels
from kernels import dual_batch_norm_reference, pgd_step_reference

from .common import device, ms_per_call, read_figures
from .record import BUDGET_SKIP, SMOKE_SKIP, StageRecord, error_line

EPS, ALPHA = 8 / 255, 2 / 255
PGD_SHAPES = [(128, 3, 32, 32), (512, 3, 32, 32)]
PGD_STREAM = (1 << 26,)  # 64M elements: far beyond L2
BN_SITES = [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)]
BN_STREAM = (2048, 64, 32, 32)
SMOKE_PGD, SMOKE_BN = [(8, 3, 32, 32)], [(4, 8, 8, 8)]
WALL_CALLS, SMOKE_WALL_CALLS = 200, 2
ROW_S, COMPILE_ROW_S = 1.5, 10.0  # cap time a row needs to start (an Inductor row compiles first)


def pgd_inputs(shape, dev):
    x = torch.rand(shape, device=dev)
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    x_adv = (x + 0.01).clamp(0, 1)
    return x, x_adv, torch.randn_like(x)


def pgd_fn(impl: str, shape, dev) -> tuple[Callable[[], Any], int]:
    x, x_adv, grad = pgd_inputs(shape, dev)
    nbytes = 4 * x.numel() * x.element_size()  # read x, x_adv, grad; write out
    if impl == "triton":
        return lambda: kernels.pgd_step(x, x_adv, grad, EPS, ALPHA), nbytes
    op = pgd_step_reference if impl == "eager" else torch.compile(pgd_step_reference, dynamic=False)
    return lambda: op(x, x_adv, grad, EPS, ALPHA), nbytes


def bn_state(channels: int, dev) -> list[torch.Tensor]:
    ones, zeros = torch.ones(channels, device=dev), torch.zeros(channels, device=dev)
    state = [ones.clone().requires_grad_(), zeros.clone().requires_grad_(), zeros.clone(), ones.clone()] * 2
    return [t if i < 4 else t.detach().clone().requires_grad_(t.requires_grad) for i, t in enumerate(state)]


def bn_fn(impl: str, shape, backward: bool, dev) -> tuple[Callable[[], Any], int]:
    x = torch.randn(shape, device=dev, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    if backward:
        x.requires_grad_()
    n, size = x.numel(), x.element_size()
    nbytes = 3 * n * size + ((2 * (2 + 1) + 1) * n * size if backward else 0)  # kernels_bench's counts (relu)
    op = {"triton": kernels.dual_batch_norm, "aten": dual_batch_norm_reference}.get(impl)
    if op is None:
        op = torch.compile(dual_batch_norm_reference, dynamic=False)
    return _dual_bn_call(op, x, bn_state(shape[1], dev), backward=backward), nbytes


def timings(fn: Callable[[], Any], impl: str, dev, smoke: bool) -> dict[str, Any]:
    with kernels.force_backend("triton" if impl == "triton" else None):
        fn()  # compile / autotune outside the timings
        if smoke:
            return {
                "gpu_us": SMOKE_SKIP,
                "graph_us": SMOKE_SKIP,
                "wall_us": 1e3 * ms_per_call(fn, SMOKE_WALL_CALLS, dev),
            }
        row = {"gpu_us": 1e3 * triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")}
        try:
            row["graph_us"] = 1e3 * triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median")
        except Exception as exc:  # noqa: BLE001 - not capturable is a finding, not a crash
            row["graph_us"], row["graph_error"] = None, error_line(exc)
        row["wall_us"] = 1e3 * ms_per_call(fn, WALL_CALLS, dev)
    return row


def measure(record: StageRecord, op: str, impl: str, shape, direction: str, make, dev, copy_tb_s) -> dict | None:
    need = COMPILE_ROW_S if impl == "inductor" else ROW_S
    base = {"op": op, "impl": impl, "shape": "x".join(map(str, shape)), "direction": direction}
    if impl == "inductor" and record.smoke:
        return record.row(base | {"status": SMOKE_SKIP})
    if not record.has_time(need):
        return record.row(base | {"status": BUDGET_SKIP})
    start = time.monotonic()
    try:
        fn, nbytes = make()
        row = base | timings(fn, impl, dev, record.smoke)
    except Exception as exc:  # noqa: BLE001 - one case failing leaves the others
        return record.row(base | {"status": "error", "error": error_line(exc)})
    row |= bandwidth(row, nbytes, copy_tb_s)
    row["seconds"] = round(time.monotonic() - start, 2)
    return record.row({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()})


def bandwidth(row: dict[str, Any], nbytes: int, copy_tb_s: float | None) -> dict[str, Any]:
    """GB/s (and % of the copy ceiling) from the GPU time inside a CUDA graph where measured, else from do_bench's
    one-call time, else from the wall time per call; `gb_s_from` names the column, `cold_gb_s` is do_bench's."""
    basis = next((k for k in ("graph_us", "gpu_us") if isinstance(row.get(k), float)), "wall_us")
    out = {"gb_s": round(nbytes / row[basis] / 1e3, 1), "gb_s_from": basis}
    if basis == "graph_us" and isinstance(row.get("gpu_us"), float):
        out["cold_gb_s"] = round(nbytes / row["gpu_us"] / 1e3, 1)
    out["pct_copy"] = round(100 * out["gb_s"] / (1e3 * copy_tb_s), 1) if copy_tb_s else None
    return out


def plan(smoke: bool, dev) -> list[tuple]:
    """(op, impl, shape, direction, make) in priority order: Triton and eager first, Inductor (compiles) last."""
    pgd_shapes = SMOKE_PGD if smoke else PGD_SHAPES
    rn18 = SMOKE_BN if smoke else [(256, *site) for site in BN_SITES]
    big = [] if smoke else [(1024, *site) for site in BN_SITES]
    pgd_stream, bn_stream = ([], []) if smoke else ([PGD_STREAM], [BN_STREAM])

    def pgd(impls, shapes):
        return [("pgd_step", i, s, "step", lambda i=i, s=s: pgd_fn(i, s, dev)) for s in shapes for i in impls]

    def bn(impls, shapes):
        return [
            ("dual_bn", i, s, d, lambda i=i, s=s, d=d: bn_fn(i, s, d == "fwd+bwd", dev))
            for s in shapes
            for d in ("fwd", "fwd+bwd")
            for i in impls
        ]

    fast = ("triton", "eager")
    rows = pgd(fast, pgd_shapes) + bn(("triton", "aten"), rn18) + pgd(fast, pgd_stream)
    rows += bn(("triton", "aten"), bn_stream + big)
    return rows + pgd(("inductor",), pgd_shapes) + bn(("inductor",), rn18 + big + bn_stream)


def inductor_wins(rows: list[dict]) -> list[str]:
    """Cases where Inductor's fused reference beats the Triton kernel in GPU time: there, perf.kernels should be
    off under compile. Compared inside CUDA graphs where both were captured (the attack runs captured; do_bench's
    one-call time counts the eager Triton op's launch gaps, ~0.1-1.5 ms, which Inductor's launches do not have);
    on do_bench's time only where neither was; a case only one side captured is not compared."""
    times = {(r["op"], r["shape"], r["direction"], r["impl"]): r for r in rows}
    wins = []
    for (op, shape, direction, impl), row in times.items():
        triton_row = times.get((op, shape, direction, "triton"))
        if impl != "inductor" or triton_row is None:
            continue
        captured = [isinstance(r.get("graph_us"), float) for r in (row, triton_row)]
        column = "graph_us" if all(captured) else "gpu_us" if not any(captured) else None
        us, triton_us = (row.get(column), triton_row.get(column)) if column else (None, None)
        if isinstance(us, float) and isinstance(triton_us, float) and us < triton_us:
            wins.append(f"{op} {direction} {shape}: inductor {us:.1f} us < triton {triton_us:.1f} us ({column})")
    return wins


def kernels_speed(record: StageRecord) -> None:
    dev = device()
    # one compiled reference per shape and direction: never fall back (recompile_limit from torch 2.7, aliased)
    torch._dynamo.config.cache_size_limit = 64
    copy_tb_s = read_figures(record, "ceilings").get("copy_tb_s")
    planned = plan(record.smoke, dev)
    record.figure("planned", len(planned))
    rows = []

    def run(case) -> None:
        op, impl, shape, direction, make = case
        row = measure(record, op, impl, shape, direction, make, dev, copy_tb_s)
        rows.append(row)
        if impl == "triton" and shape in (PGD_STREAM, BN_STREAM) and row.get("gb_s") and direction in ("step", "fwd"):
            record.figure("pgd_stream_tb_s" if op == "pgd_step" else "bn_stream_tb_s", round(row["gb_s"] / 1e3, 3))
        record.figure("measured", sum("wall_us" in r for r in rows))

    for case in planned:
        if case[1] != "inductor":
            run(case)
    # Inductor's rows compile one graph each (the first also starts the compile workers): a cut at the cap among them
    # leaves the stage ok, with the comparison as far as it got
    with record.optional("inductor rows"):
        for case in planned:
            if case[1] == "inductor":
                run(case)
                compare_with_inductor(record, rows)
    compare_with_inductor(record, rows)


def compare_with_inductor(record: StageRecord, rows: list[dict]) -> None:
    wins = inductor_wins([r for r in rows if "gpu_us" in r])
    record.figure("inductor_beats_triton", wins if not record.smoke else SMOKE_SKIP)
    if wins:
        record.figure("advice", "Inductor beats Triton at some RN18 shapes: consider perf.kernels=off under compile")
