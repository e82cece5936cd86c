"""Host cost of one eager call of the fused ops' Triton route, without the kernels: what an uncompiled CUDA step pays
in Python per call before Triton's own launcher (the custom op, autograd, plans, allocations, running buffers).

    python bench/launch_overhead.py [--reps 500] [--out bench/results/launch_overhead.jsonl]

Runs on a CPU with compiled Triton (no TRITON_INTERPRET): the route is opened to CPU tensors and every
`wrap_triton(kernel)[grid](...)` launch replaced by a no-op, so the figure is the engine's and torch's dispatch
alone, on tiny tensors; "aten" is the unfused baseline (kernels.dual_batch_norm_reference: two F.batch_norm + ReLU;
the engine's unfused PGD step, engine.attacks.step.pgd_step_reference) on the same tensors, its compute included
(small at these sizes). On the H200 (docs/gpu.md) the eager fused dual BN took 2-3.5x aten's wall time per call at
training sizes: this is the part of that a CPU can measure.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import harness  # noqa: F401  (puts the repository on sys.path)
import torch
from harness import append_jsonl, markdown_table, positive_int, provenance, run_cli

COLUMNS = ["op", "route", "us_per_call"]
EPS, ALPHA = 8 / 255, 2 / 255


class _NoLaunch:
    """Stands in for wrap_triton(kernel): indexing by a grid gives a launcher that does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def open_route_without_launches() -> None:
    """The public ops take the triton_op route on CPU tensors and launch nothing."""
    import kernels
    from kernels import _dispatch
    from kernels.dual_bn import triton_impl as dual_bn_triton
    from kernels.pgd_step import triton_impl as pgd_triton

    for module in (dual_bn_triton, pgd_triton):
        module.wrap_triton = lambda kernel: _NoLaunch()
    _dispatch.TRACED_TRITON_DEVICES = ("cuda", "cpu")
    _dispatch.triton_compiled = lambda: True
    kernels.load_triton_ops()


def calls() -> list[tuple[str, str, Callable[[], object]]]:
    import kernels
    from engine.attacks.step import pgd_step_reference

    x = torch.randn(8, 4, 4, 4).to(memory_format=torch.channels_last).requires_grad_()
    weight, bias = (
        [torch.ones(4, requires_grad=True) for _ in range(2)],
        [torch.zeros(4, requires_grad=True) for _ in range(2)],
    )
    mean, var = [torch.zeros(4) for _ in range(2)], [torch.ones(4) for _ in range(2)]

    def fused(backward: bool) -> Callable[[], object]:
        def run():
            with torch.set_grad_enabled(backward):
                y = kernels.dual_batch_norm(x, weight[0], bias[0], mean[0], var[0], weight[1], bias[1], mean[1],
                                            var[1], training=True, momentum=0.1, eps=1e-5, relu=True)  # fmt: skip
                if backward:
                    y.sum().backward()

        return run

    def aten(backward: bool) -> Callable[[], object]:  # two F.batch_norm + ReLU, as bench/kernels_bench.py's "aten"
        def run():
            with torch.set_grad_enabled(backward):
                y = kernels.dual_batch_norm_reference(x, weight[0], bias[0], mean[0], var[0], weight[1], bias[1],
                                                      mean[1], var[1], training=True, momentum=0.1, eps=1e-5,
                                                      relu=True)  # fmt: skip
                if backward:
                    y.sum().backward()

        return run

    clean, grad = torch.rand(8, 3, 4, 4), torch.randn(8, 3, 4, 4)
    return [
        ("dual_bn fwd", "triton_op", fused(False)),
        ("dual_bn fwd", "aten", aten(False)),
        ("dual_bn fwd+bwd", "triton_op", fused(True)),
        ("dual_bn fwd+bwd", "aten", aten(True)),
        ("pgd_step", "triton_op", lambda: kernels.pgd_step(clean, clean, grad, EPS, ALPHA)),
        ("pgd_step", "aten", lambda: pgd_step_reference(clean, clean, grad, EPS, ALPHA)),  # the unfused engine step
    ]


def per_call_us(fn: Callable[[], object], reps: int) -> float:
    """Median over 5 rounds of the mean time per call."""
    for _ in range(max(10, reps // 10)):
        fn()
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        rounds.append((time.perf_counter() - start) / reps * 1e6)
    return sorted(rounds)[2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=positive_int, default=500, help="calls per timed round (5 rounds)")
    parser.add_argument("--out", default="bench/results/launch_overhead.jsonl", help="JSON-lines file to append to")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("launch_overhead: run without TRITON_INTERPRET=1 (the interpreter replaces the route being measured)")
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print("launch_overhead: needs triton (pip install arat[kernels])")
        return 2
    torch.set_num_threads(1)  # dispatch cost, not parallel compute
    open_route_without_launches()
    rows = [{"op": op, "route": route, "us_per_call": round(per_call_us(fn, args.reps), 1)}
            for op, route, fn in calls()]  # fmt: skip
    stamp = provenance("cpu")  # dispatch on the host: the launches are stubbed
    append_jsonl(args.out, [{**row, **stamp} for row in rows])
    print(f"{stamp['cpu']}, torch {stamp['torch']}, triton {stamp['triton']}, 1 thread, launches stubbed")
    print(markdown_table(rows, COLUMNS))
    return 0


if __name__ == "__main__":
    run_cli(main, "bench/launch_overhead.py")
