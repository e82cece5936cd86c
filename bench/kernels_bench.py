"""Micro-benchmarks of the fused ops on every backend available on one device: reference and native on a CPU,
reference and Triton on CUDA (--device; on a GPU machine `--device cpu` measures the CPU backends).

    python bench/kernels_bench.py [--quick] [--device auto|cpu|cuda] [--out bench/results/kernels.jsonl]

Effective bandwidth = bytes / median time, with bytes from the minimal traffic of the fused algorithm (the same
count for every backend, so GB/s compare like for like; N = elements, s = bytes per element):
  pgd_step                 read x, x_adv, grad, write out:                     4 N s
  dual_bn forward (train)  read x for the statistics, read x + write y:        3 N s
  dual_bn fwd+bwd (train)  forward 3 N s; backward reads grad, x (and y for the ReLU mask) in the reduction and again
                           for grad_x, writes grad_x: (2 (2 + relu) + 1) N s
Parameters, statistics and partial sums (O(C)) are not counted. "aten" is the unfused baseline for dual_bn: two
F.batch_norm calls, torch.cat and a ReLU.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import harness  # noqa: F401  (puts the repository on sys.path)
import torch
from harness import append_jsonl, bench_device, markdown_table, positive_int, provenance, run_cli

import kernels

PGD_SHAPES = {"full": [(128, 3, 32, 32), (512, 3, 32, 32)], "quick": [(16, 3, 32, 32)]}
BN_SHAPES = {"full": [(2 * 128, 64, 32, 32), (2 * 128, 512, 4, 4)], "quick": [(2 * 8, 64, 16, 16), (2 * 8, 512, 4, 4)]}
COLUMNS = ["op", "shape", "dtype", "backend", "median_ms", "gb_per_s", "timing"]


def timed(fn: Callable[[], object], device: torch.device, warmup: int, reps: int) -> tuple[float, str]:
    """Median milliseconds of fn() and how they were taken. On the GPU: Triton's `do_bench_cudagraph` (replays of a
    captured call: GPU time without launch gaps; L2 is not flushed, so shapes that fit in it read from it); where the
    call cannot be captured, `do_bench` (CUDA events around one call after an L2 flush: for an op of several launches
    with Python between them, the GPU waits on the host inside that window: the H200's eager dual BN forward read
    684 us there and 293 us in a graph). On the CPU: perf_counter (the op is synchronous there)."""
    if device.type == "cuda":
        from triton.testing import do_bench, do_bench_cudagraph

        torch.cuda.synchronize()  # the inputs' kernels done: the capture's warm-up runs on a side stream
        try:
            return do_bench_cudagraph(fn, return_mode="median"), "cuda graph"
        except Exception as exc:  # noqa: BLE001 - not capturable: one call between events, launch gaps included
            why = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]}"
            return do_bench(fn, return_mode="median"), f"one call (do_bench; not captured: {why})"
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        begin = time.perf_counter()
        fn()
        samples.append(1e3 * (time.perf_counter() - begin))
    return statistics.median(samples), "perf_counter"


def backends(device: torch.device) -> list[str]:
    report = kernels.available_backends()
    if device.type == "cuda":
        return ["reference", "triton"] if report["triton"]["active"] else ["reference"]
    return ["reference", "native"] if report["native"]["active"] else ["reference"]


def bench_pgd(shape, dtype, device, args) -> list[dict]:
    x = torch.rand(shape, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    x_adv, grad = (x + 0.01).clamp(0, 1), torch.randn_like(x)
    rows = []
    for backend in backends(device):
        with kernels.force_backend(backend):
            ms = timed(lambda: kernels.pgd_step(x, x_adv, grad, 8 / 255, 2 / 255), device, args.warmup, args.reps)
        rows.append(_row("pgd_step", shape, dtype, backend, *ms, 4 * x.numel() * x.element_size()))
    return rows


def bench_dual_bn(shape, dtype, device, args) -> list[dict]:
    channels = shape[1]
    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    state = [  # per branch (clean, adv): weight, bias, running mean, running var; each its own tensor
        t
        for _ in range(2)
        for t in (
            torch.ones(channels, device=device),
            torch.zeros(channels, device=device),
            torch.zeros(channels, device=device),
            torch.ones(channels, device=device),
        )
    ]
    for t in state[0], state[1], state[4], state[5]:
        t.requires_grad_()
    bytes_fwd = 3 * x.numel() * x.element_size()
    bytes_fwd_bwd = bytes_fwd + (2 * (2 + 1) + 1) * x.numel() * x.element_size()
    rows = []
    for backend in ["aten", *backends(device)]:
        op = kernels.dual_batch_norm_reference if backend == "aten" else kernels.dual_batch_norm
        forced = None if backend == "aten" else backend
        with kernels.force_backend(forced):
            forward = _dual_bn_call(op, x, state, backward=False)
            fwd_bwd = _dual_bn_call(op, x.detach().requires_grad_(), state, backward=True)
            fwd_ms = timed(forward, device, args.warmup, args.reps)
            rows.append(_row("dual_bn fwd", shape, dtype, backend, *fwd_ms, bytes_fwd))
            fwd_bwd_ms = timed(fwd_bwd, device, args.warmup, args.reps)
            rows.append(_row("dual_bn fwd+bwd", shape, dtype, backend, *fwd_bwd_ms, bytes_fwd_bwd))
    return rows


def _dual_bn_call(op, x, state, backward: bool) -> Callable[[], object]:
    # an upstream gradient of its own: y.backward(y) would hand the backward one buffer as grad_y and y, read once
    # from memory where the byte count has two reads
    grad = torch.randn_like(x) if backward else None

    def run():
        with torch.set_grad_enabled(backward):
            y = op(x, *state, training=True, momentum=0.1, eps=1e-5, relu=True)
            if backward:
                for t in (x, *state):  # fresh gradients: accumulating into the last call's would time an extra add
                    t.grad = None
                y.backward(grad)
        return y

    return run


def _row(op, shape, dtype, backend, ms, timing, nbytes) -> dict:
    return {
        "op": op,
        "shape": "x".join(map(str, shape)),
        "dtype": str(dtype).removeprefix("torch."),
        "backend": backend,
        "median_ms": ms,
        "timing": timing,
        "gb_per_s": nbytes / ms / 1e6,
        "bytes": nbytes,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, a few repetitions")
    parser.add_argument("--out", default="bench/results/kernels.jsonl", help="JSON-lines file to append to")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--reps", type=positive_int, help="CPU: timed repetitions (default 20, 5 with --quick)")
    parser.add_argument("--warmup", type=int, default=2, help="CPU: untimed calls first")
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="auto", help="auto (CUDA where present), cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    args.reps = args.reps or (5 if args.quick else 20)
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = bench_device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    kernels.load_native()
    size = "quick" if args.quick else "full"
    rows = [r for shape in PGD_SHAPES[size] for r in bench_pgd(shape, dtype, device, args)]
    rows += [r for shape in BN_SHAPES[size] for r in bench_dual_bn(shape, dtype, device, args)]
    stamp = provenance(device)
    # the fused backend that did not run here: a row saying why (its rows are absent, not slower)
    fused = "triton" if device.type == "cuda" else "native"
    report = kernels.available_backends()[fused]
    skipped = [] if report["active"] else [{"kernel": "all", "backend": fused, "skipped": report["detail"]}]
    if skipped:
        print(f"skip {fused}: {report['detail']}")
    append_jsonl(args.out, [{**row, **stamp} for row in rows + skipped])
    print(f"{stamp['device']}, {stamp['cpu_threads']} CPU threads, torch {stamp['torch']}, triton {stamp['triton']}")
    print(markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    run_cli(main, "bench/kernels_bench.py")
