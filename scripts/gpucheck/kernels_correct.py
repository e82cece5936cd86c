"""Stage `kernels_correct`: every fused op forced to Triton and compared with its reference, on a NaN-poisoned
allocator; the RNG kernel under CUDA-graph replay; torch.library.opcheck on the three registered ops. The short
cases run first and the long dual-BN grid last (one fp32 case per layout at its head); cases a cap leaves out are
counted in the `not_run` figure.

Each row: op, shape, dtype, layout, mode, relu, direction, rel_err, max_abs_err, tol, pass. On every call
`last_backend()` must say triton and logger `kernels` must catch no fallback message.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch

import kernels
from kernels import dual_batch_norm_reference, pgd_step_reference

from .common import device
from .record import BUDGET_SKIP, SMOKE_SKIP, StageFailed, StageRecord, error_line

EPS, ALPHA = 8 / 255, 2 / 255
PGD_SHAPES = [(128, 3, 32, 32), (512, 3, 32, 32), (3, 3, 5, 7), (7,)]
SMOKE_PGD_SHAPES = [(3, 3, 5, 7), (7,)]
PGD_DTYPES = {  # (x, x_adv, grad); the output has x_adv's dtype
    "fp32": (torch.float32, torch.float32, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16, torch.bfloat16),
    "fp16": (torch.float16, torch.float16, torch.float16),  # autocast's dtype on a GPU without bf16 (a T4)
    "mixed": (torch.float32, torch.bfloat16, torch.float16),
}
RN18_SITES = [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)]  # (C, H, W) of ResNet-18's BNs
ODD_SHAPES = [(6, 5, 3, 7), (10, 70, 12, 12)]
SMOKE_SITES = [(64, 4, 4)]  # one of the width-8 ResNet-18's: the interpreter takes ~1 s per larger case
BN_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}  # fp16 rounds 8x finer than bf16
UNIFORM_DRAWS, SMOKE_UNIFORM_DRAWS = 1 << 20, 1 << 14
ROW_SECONDS = {"cuda": 4.0, "cpu": 1.0}  # cap left for a case to start: on CUDA it may compile kernels first


class FallbackCatcher(logging.Handler):
    """Collects the `kernels` logger's messages: any is a silent fallback to the reference."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, rec: logging.LogRecord) -> None:
        self.messages.append(rec.getMessage())


class Checker:
    """Adds rows, counting passes; a failed row becomes the stage's first error."""

    def __init__(self, record: StageRecord, catcher: FallbackCatcher):
        self.record, self.catcher = record, catcher
        self.passed = self.total = 0
        self.last = time.monotonic()

    def backend_ok(self, *ops: str) -> tuple[bool, str | None]:
        used = kernels.last_backend()
        wrong = [f"{op} ran on {used.get(op)}" for op in ops if used.get(op) != "triton"]
        fallbacks = list(self.catcher.messages)
        self.catcher.messages.clear()
        problems = wrong + [f"fallback: {m}" for m in fallbacks]
        return not problems, "; ".join(problems) or None

    def add(self, row: dict[str, Any]) -> None:
        self.total += 1
        self.passed += bool(row["pass"])
        row["seconds"], self.last = round(time.monotonic() - self.last, 3), time.monotonic()
        self.record.data["figures"] |= {"passed": self.passed, "total": self.total}  # a cut keeps the counts
        self.record.row(row)
        if not row["pass"]:
            self.record.fail(f"{row['op']} {row.get('shape')} {row.get('dtype')} {row.get('layout', '')} "
                             f"{row.get('direction', '')}: {row.get('why') or 'mismatch'}")  # fmt: skip

    def budget_left(self) -> bool:
        return self.record.has_time(ROW_SECONDS[device().type])

    def case(self, op: str, shape, fn, *args) -> None:
        """Run one case (it adds its own rows); an exception becomes a failing row, and the next case still runs."""
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - a Triton compile or capture error must not hide the other cases
            self.catcher.messages.clear()
            self.add({"op": op, "shape": None if shape is None else list(shape), "dtype": "-", "layout": "-",
                      "mode": "-", "direction": "-", "pass": False, "why": error_line(exc)})  # fmt: skip


def poison(like: torch.Tensor) -> None:
    """Leave a NaN-filled block in the caching allocator, so an output the op forgets to write stays NaN."""
    block = torch.full_like(like, math.nan)
    del block


def make_layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t.contiguous()


def rel_err(out: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[float, float]:
    """(||out - ref|| / ||ref||, max |out - ref|) in float64, over `mask` when given."""
    a, b = out.double(), ref.double()
    if mask is not None:
        a, b = a[mask], b[mask]
    if a.numel() == 0:
        return 0.0, 0.0
    diff = a - b
    denom = b.norm().item() or 1.0
    return diff.norm().item() / denom, diff.abs().max().item()


# -- pgd_step ------------------------------------------------------------------------------------------------
def pgd_inputs(shape, dtypes, channels_last: bool, dev, seed: int, nans: bool = True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=gen)
    x_adv = (x + (2 * torch.rand(shape, generator=gen) - 1) * EPS).clamp(0, 1)
    grad = torch.randn(shape, generator=gen)
    grad[torch.rand(shape, generator=gen) < 0.1] = 0.0  # 10% zeros
    if nans:  # a few in grad (sign(NaN) = 0) and in x_adv (propagates)
        grad.view(-1)[torch.randint(0, grad.numel(), (3,), generator=gen)] = math.nan
        x_adv.view(-1)[torch.randint(0, grad.numel(), (2,), generator=gen)] = math.nan
    tensors = [make_layout(t, channels_last and t.dim() == 4) for t in (x, x_adv, grad)]
    return [t.to(dev, dt) for t, dt in zip(tensors, dtypes, strict=True)]


def pgd_case(check: Checker, shape, dtype_name: str, channels_last: bool, dev) -> dict[str, Any]:
    x, x_adv, grad = pgd_inputs(shape, PGD_DTYPES[dtype_name], channels_last, dev, seed=len(shape) + shape[0])
    ref = pgd_step_reference(x, x_adv, grad, EPS, ALPHA)
    poison(ref)
    out = kernels.pgd_step(x, x_adv, grad, EPS, ALPHA)
    backend_ok, why = check.backend_ok("pgd_step")
    nan_in, valid = x_adv.isnan(), ~x_adv.isnan()
    exact = torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.nan_to_num(-7.0), ref.nan_to_num(-7.0))
    low_precision = out.dtype != torch.float32
    # below 1, half a bf16 ulp is 2^-9; the interpreter truncates instead of rounding (a whole ulp, not exact)
    interpreted = low_precision and dev.type == "cpu"
    tol = EPS + 1e-6 + (2.0**-8 if interpreted else 2.0**-9 if low_precision else 0.0)
    if interpreted:
        exact = exact or torch.allclose(out.float(), ref.float(), rtol=2.0**-7, atol=0.0, equal_nan=True)
    dist = (out.float() - x.float()).abs()[valid].max().item() if valid.any() else 0.0
    in_range = bool(((out[valid] >= 0) & (out[valid] <= 1)).all())
    nan_ok = torch.equal(out.isnan(), nan_in)
    err, max_abs = rel_err(out, ref, valid)
    ok = exact and dist <= tol and in_range and nan_ok and backend_ok and out.stride() == x_adv.stride()
    checks = {
        "not exactly the reference": exact,
        f"|out-x| {dist:.3g} > {tol:.3g}": dist <= tol,
        "out of [0,1]": in_range,
        "NaN where x_adv had none": nan_ok,
    }
    reasons = [name for name, good in checks.items() if not good]
    return {
        "op": "pgd_step", "shape": list(shape), "dtype": dtype_name, "layout": layout_name(channels_last, shape),
        "mode": "-", "relu": None, "direction": "forward", "rel_err": err, "max_abs_err": max_abs, "tol": 0.0,
        "linf_to_x": dist, "pass": ok, "why": "; ".join(reasons + ([why] if why else [])) or None,
    }  # fmt: skip


def layout_name(channels_last: bool, shape) -> str:
    return "channels_last" if channels_last and len(shape) == 4 else "contiguous"


def pgd_grid(smoke: bool) -> list[tuple]:
    shapes = SMOKE_PGD_SHAPES if smoke else PGD_SHAPES
    return [(s, cl, d) for s in shapes for cl in ((False, True) if len(s) == 4 else (False,)) for d in PGD_DTYPES]


def pgd_rows(check: Checker, dev, smoke: bool) -> None:
    grid = pgd_grid(smoke)
    for i, (shape, channels_last, dtype_name) in enumerate(grid):
        if not check.budget_left():
            return skip_row(check.record, "pgd_step", shape, len(grid) - i)
        check.case("pgd_step", shape, lambda *a: check.add(pgd_case(*a)), check, shape, dtype_name, channels_last, dev)


def skip_row(record: StageRecord, op: str, shape, not_run: int) -> None:
    """The budget ran out: one row for the `not_run` cases of `op` left, and the stage's `not_run` count."""
    record.data["figures"]["not_run"] = record.data["figures"].get("not_run", 0) + not_run
    record.row({"op": op, "shape": list(shape), "status": BUDGET_SKIP, "cases_not_run": not_run})


# -- uniform_start -------------------------------------------------------------------------------------------
def uniform_row(check: Checker, dev, smoke: bool) -> None:
    n = SMOKE_UNIFORM_DRAWS if smoke else UNIFORM_DRAWS
    x = torch.full((n,), 0.5, device=dev)  # no clamping: (out - x) / eps is U(-1, 1)
    torch.manual_seed(0)
    first = kernels.uniform_start(x, EPS)
    torch.manual_seed(0)
    again = kernels.uniform_start(x, EPS)
    backend_ok, why = check.backend_ok("uniform_start")
    noise = ((first.double() - 0.5) / EPS).float()
    deciles = torch.quantile(noise, torch.linspace(0.1, 0.9, 9, device=dev)).tolist()
    expected = [-0.8 + 0.2 * i for i in range(9)]
    edge = torch.rand(n, device=dev)  # values near 0 and 1 clamp
    clamped = kernels.uniform_start(edge, EPS)
    in_range = bool((clamped >= 0).all() and (clamped <= 1).all() and (clamped - edge).abs().max() <= EPS + 1e-6)
    mean, std = noise.mean().item(), noise.std().item()
    decile_err = max(abs(a - b) for a, b in zip(deciles, expected, strict=True))
    stat_tol = 0.01 if not smoke else 0.05  # 2^14 draws in smoke
    ok = torch.equal(first, again) and in_range and backend_ok and abs(mean) < stat_tol
    ok = ok and abs(std - 1 / math.sqrt(3)) < stat_tol and decile_err < stat_tol
    check.add({
        "op": "uniform_start", "shape": [n], "dtype": "fp32", "layout": "contiguous", "mode": "seeded",
        "direction": "forward", "deterministic": torch.equal(first, again), "in_range": in_range,
        "mean": round(mean, 5), "std": round(std, 5), "deciles": [round(d, 4) for d in deciles],
        "rel_err": decile_err, "max_abs_err": None, "tol": stat_tol, "pass": ok, "why": why,
    })  # fmt: skip


def graph_replay_row(check: Checker, dev) -> None:
    """One uniform_start captured in a CUDA graph, replayed twice: the draws must differ (docs/kernels.md)."""
    if dev.type != "cuda":
        check.record.row({"op": "uniform_start", "mode": "cuda-graph replay", "status": SMOKE_SKIP})
        return
    x = torch.rand(1 << 16, device=dev)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        kernels.uniform_start(x, EPS)  # compile and allocate outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kernels.uniform_start(x, EPS)
    graph.replay()
    first = out.clone()
    graph.replay()
    second = out.clone()
    torch.cuda.synchronize()
    differ = not torch.equal(first, second)
    in_range = all(
        bool(((t - x).abs() <= EPS + 1e-6).all() and (t >= 0).all() and (t <= 1).all()) for t in (first, second)
    )
    check.add({
        "op": "uniform_start", "shape": [1 << 16], "dtype": "fp32", "layout": "contiguous", "mode": "cuda-graph replay",
        "direction": "forward", "replays_differ": differ, "in_range": in_range, "rel_err": None, "max_abs_err": None,
        "tol": None, "pass": differ and in_range, "why": None if differ else "two replays drew the same noise",
    })  # fmt: skip


# -- dual_batch_norm -------------------------------------------------------------------------------------------
def bn_state(channels: int, dev, gen: torch.Generator) -> list[torch.Tensor]:
    """(clean w, b, running mean, var, adv w, b, running mean, var), fp32, as the public op takes them."""
    state = []
    for _ in range(2):
        weight = 1 + 0.2 * torch.randn(channels, generator=gen)
        bias = 0.1 * torch.randn(channels, generator=gen)
        state += [weight, bias, 0.1 * torch.randn(channels, generator=gen), 0.5 + torch.rand(channels, generator=gen)]
    return [t.to(dev) for t in state]


def bn_inputs(shape, dtype, channels_last: bool, dev, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = make_layout(1.5 * torch.randn(shape, generator=gen) + 0.3, channels_last).to(dev, dtype)
    grad_y = make_layout(torch.randn(shape, generator=gen), channels_last).to(dev, dtype)
    return x, grad_y, bn_state(shape[1], dev, gen)


def run_public(x, grad_y, state, training: bool, relu: bool) -> dict[str, torch.Tensor]:
    """The op under test (or the float64 reference) with its outputs, buffers and gradients."""
    leaf = x.detach().clone().requires_grad_()
    params = [t.detach().clone().requires_grad_(i % 4 < 2) for i, t in enumerate(state)]
    op = kernels.dual_batch_norm if x.dtype != torch.float64 else dual_batch_norm_reference
    poison(x)
    y = op(leaf, *params, training=training, momentum=0.1, eps=1e-5, relu=relu)
    forward_backend = kernels.last_backend().get("dual_batch_norm")
    poison(x)
    y.backward(grad_y)
    return {
        "y": y.detach(), "running_mean": torch.stack([params[2], params[6]]), "running_var": torch.stack([params[3],
        params[7]]), "grad_x": leaf.grad, "grad_weight": torch.stack([params[0].grad, params[4].grad]),
        "grad_bias": torch.stack([params[1].grad, params[5].grad]), "forward_backend": forward_backend,
    }  # fmt: skip


def batch_stats(x, state, training: bool, relu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased var), (2, C): from the registered op itself (functional: buffers untouched)."""
    w = [t.detach() for t in state]
    _, mean, var = torch.ops.arat.dual_batch_norm(
        x, w[0], w[1], w[4], w[5], w[2], w[3], w[6], w[7], training, 1e-5, relu
    )
    return mean, var


def reference_stats(x64: torch.Tensor, state64, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if not training:
        return torch.stack([state64[2], state64[6]]), torch.stack([state64[3], state64[7]])
    halves = x64.unflatten(0, (2, -1))  # (2, B, C, H, W)
    var, mean = torch.var_mean(halves, dim=(1, 3, 4), correction=0)
    return mean, var


def compare(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float, str, bool]:
    """(worst rel err, worst abs err, its tensor, all finite) over named (out, ref) pairs."""
    worst, worst_abs, worst_name, finite = 0.0, 0.0, "", True
    for name, (out, ref) in pairs.items():
        finite = finite and bool(torch.isfinite(out).all())
        err, max_abs = rel_err(out, ref)
        if err >= worst:
            worst, worst_name = err, name
        worst_abs = max(worst_abs, max_abs)
    return worst, worst_abs, worst_name, finite


def bn_case(check: Checker, shape, dtype, channels_last: bool, training: bool, relu: bool, dev) -> None:
    x, grad_y, state = bn_inputs(shape, dtype, channels_last, dev, seed=shape[0] * 7 + shape[1])
    got = run_public(x, grad_y, state, training, relu)
    backend_ok, why = check.backend_ok("dual_batch_norm", "dual_batch_norm_backward")
    mean, var = batch_stats(x, state, training, relu)
    state64 = [t.double() for t in state]
    ref = run_public(x.double(), grad_y.double(), state64, training, relu)
    ref_mean, ref_var = reference_stats(x.double(), state64, training)
    directions = {
        "forward": {"y": (got["y"], ref["y"]), "mean": (mean, ref_mean), "var": (var, ref_var),
                    "running_mean": (got["running_mean"], ref["running_mean"]),
                    "running_var": (got["running_var"], ref["running_var"])},
        "backward": {k: (got[k], ref[k]) for k in ("grad_x", "grad_weight", "grad_bias")},
    }  # fmt: skip
    for direction, pairs in directions.items():
        err, max_abs, name, finite = compare(pairs)
        tol = BN_TOL[dtype]
        ok = err <= tol and finite and backend_ok
        reasons = ([f"{name} rel err {err:.3g} > {tol}"] if err > tol else []) + ([] if finite else ["NaN/inf"])
        check.add({
            "op": "dual_batch_norm", "shape": list(shape), "dtype": str(dtype).removeprefix("torch."),
            "layout": "channels_last" if channels_last else "contiguous", "mode": "train" if training else "eval",
            "relu": relu, "direction": direction, "rel_err": err, "max_abs_err": max_abs, "worst": name, "tol": tol,
            "pass": ok, "why": "; ".join(reasons + ([why] if why else [])) or None,
        })  # fmt: skip


def bn_grid(smoke: bool) -> list[tuple]:
    """bf16 x channels-last x training x relu on/off on every shape; fp32 x both layouts x train/eval on two; fp16
    (a GPU without bf16) x channels-last x training with relu on two, after the bf16 ones."""
    if smoke:  # the interpreter takes seconds per case at (10, 70, 12, 12)
        sites, fp32_shapes = [(4, *site) for site in SMOKE_SITES] + ODD_SHAPES[:1], ODD_SHAPES[:1]
    else:
        sites, fp32_shapes = [(256, *site) for site in RN18_SITES] + ODD_SHAPES, [ODD_SHAPES[1], (256, 128, 16, 16)]
    fp32 = [(s, torch.float32, cl, tr, False) for s in fp32_shapes for cl in (False, True) for tr in (True, False)]
    early = [case for case in fp32 if case[0] == fp32_shapes[0] and case[3]]  # one fp32 case per layout first
    grid = [(s, torch.bfloat16, True, True, relu) for s in sites for relu in (False, True)]
    grid += [(s, torch.float16, True, True, True) for s in (sites[0], sites[-1])]
    return early + grid + [case for case in fp32 if case not in early]


def bn_rows(check: Checker, dev, smoke: bool) -> None:
    grid = bn_grid(smoke)
    for i, (shape, dtype, channels_last, training, relu) in enumerate(grid):
        if not check.budget_left():
            return skip_row(check.record, "dual_batch_norm", shape, len(grid) - i)
        check.case("dual_batch_norm", shape, bn_case, check, shape, dtype, channels_last, training, relu, dev)


# -- opcheck ---------------------------------------------------------------------------------------------------
def opcheck_args(dev) -> dict[str, tuple]:
    x, grad_y, state = bn_inputs((6, 5, 3, 7), torch.float32, True, dev, seed=1)
    params, buffers = [state[i] for i in (0, 1, 4, 5)], [state[i] for i in (2, 3, 6, 7)]
    y, mean, var = torch.ops.arat.dual_batch_norm(x, *params, *buffers, True, 1e-5, True)
    xs = pgd_inputs((3, 3, 5, 7), PGD_DTYPES["fp32"], True, dev, seed=2, nans=False)  # NaN != NaN in opcheck
    return {
        "pgd_step": (torch.ops.arat.pgd_step.default, (*xs, EPS, ALPHA)),
        "dual_batch_norm": (torch.ops.arat.dual_batch_norm.default, (x, *params, *buffers, True, 1e-5, True)),
        "dual_batch_norm_backward": (
            torch.ops.arat.dual_batch_norm_backward.default,
            (grad_y, x, y, params[0], params[2], mean, var, True, 1e-5, True),
        ),
    }


def opcheck_rows(check: Checker, dev) -> None:
    cases = list(opcheck_args(dev).items())
    for i, (name, (op, args)) in enumerate(cases):
        if not check.budget_left():
            return skip_row(check.record, f"opcheck {name}", (), len(cases) - i)
        try:
            torch.library.opcheck(op, args)
            ok, why = True, None
        except Exception as exc:  # noqa: BLE001 - the row says which check failed
            ok, why = False, error_line(exc)
        check.catcher.messages.clear()
        check.add({"op": f"opcheck arat::{name}", "shape": None, "dtype": "fp32", "layout": str(dev),
                   "mode": "opcheck", "pass": ok, "why": why})  # fmt: skip


def kernels_correct(record: StageRecord) -> None:
    dev = device()
    catcher = FallbackCatcher()
    logging.getLogger("kernels").addHandler(catcher)
    check = Checker(record, catcher)
    record.figure("not_run", 0)
    with kernels.force_backend("triton"):  # the short cases first: the long dual-BN grid is the one a cap cuts
        for name, rows in (("pgd_step", pgd_rows), ("uniform_start", uniform_row)):
            check.case(name, None, rows, check, dev, record.smoke)
        check.case("uniform_start cuda-graph replay", None, graph_replay_row, check, dev)
        check.case("opcheck", None, opcheck_rows, check, dev)
        check.case("dual_batch_norm", None, bn_rows, check, dev, record.smoke)
    record.figure("passed", check.passed)
    record.figure("total", check.total)
    if record.failed:
        raise StageFailed(record.data["error"])
