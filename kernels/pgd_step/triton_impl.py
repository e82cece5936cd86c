"""Triton kernels for the PGD step and the uniform random start: one pass over flat (dense) storage.

The launchers take tensors that share one dense layout (op.py restrides them first) and run on CUDA, or on CPU
tensors when triton was imported under TRITON_INTERPRET=1. Kernels launch through `torch.library.wrap_triton`: a
direct launch in eager code, a traced one (a node Inductor compiles) inside the triton_ops below.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from .. import _dispatch
from .._layout import MAX_KERNEL_NUMEL
from .._triton_util import cdiv, wrap_triton

BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _pgd_step_kernel(x_ptr, x_adv_ptr, grad_ptr, out_ptr, numel, eps, alpha, BLOCK: tl.constexpr):
    eps, alpha = tl.cast(eps, tl.float32), tl.cast(alpha, tl.float32)  # Inductor passes Python floats as fp64
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
    mask = offsets < numel
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    x_adv = tl.load(x_adv_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    step = tl.where(grad > 0, alpha, tl.where(grad < 0, -alpha, 0.0))  # torch.sign: 0 for 0 and for NaN
    moved = x_adv + step
    projected = tl.minimum(
        tl.maximum(moved, x - eps, propagate_nan=tl.PropagateNan.ALL), x + eps, propagate_nan=tl.PropagateNan.ALL
    )
    clamped = tl.minimum(
        tl.maximum(projected, 0.0, propagate_nan=tl.PropagateNan.ALL), 1.0, propagate_nan=tl.PropagateNan.ALL
    )
    tl.store(out_ptr + offsets, clamped.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _uniform_start_kernel(x_ptr, seed_ptr, out_ptr, numel, eps, BLOCK: tl.constexpr):
    eps = tl.cast(eps, tl.float32)  # Inductor passes a Python float as fp64
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
    mask = offsets < numel
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    seed = tl.load(seed_ptr)  # read on the device: no host sync, and CUDA-graph replays draw fresh noise
    uniform = tl.rand(seed, offsets)  # [0, 1), Philox keyed by seed, counter = storage offset
    noisy = x + (2.0 * uniform - 1.0) * eps
    clamped = tl.minimum(
        tl.maximum(noisy, 0.0, propagate_nan=tl.PropagateNan.ALL), 1.0, propagate_nan=tl.PropagateNan.ALL
    )
    tl.store(out_ptr + offsets, clamped.to(out_ptr.dtype.element_ty), mask=mask)


def pgd_step_triton(x: torch.Tensor, x_adv: torch.Tensor, grad: torch.Tensor, eps: float, alpha: float):
    """The fused step; x, x_adv and grad must be dense with identical strides (any supported float dtypes)."""
    assert x.stride() == x_adv.stride() == grad.stride() and x.numel() <= MAX_KERNEL_NUMEL
    out = torch.empty_like(x_adv)
    numel = x_adv.numel()
    if numel:
        grid = (cdiv(numel, BLOCK),)
        wrap_triton(_pgd_step_kernel)[grid](
            x, x_adv, grad, out, numel, float(eps), float(alpha), BLOCK=BLOCK, num_warps=NUM_WARPS
        )
    return out


def uniform_start_triton(x: torch.Tensor, eps: float, seed: torch.Tensor) -> torch.Tensor:
    """clamp(x + U(-eps, eps), 0, 1) for a dense x; `seed` is a one-element int64 tensor on x's device."""
    assert x.numel() <= MAX_KERNEL_NUMEL and seed.numel() == 1 and seed.dtype == torch.int64
    out = torch.empty_like(x)
    numel = x.numel()
    if numel:
        grid = (cdiv(numel, BLOCK),)
        wrap_triton(_uniform_start_kernel)[grid](x, seed, out, numel, float(eps), BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out


@triton_op("arat::pgd_step_triton", mutates_args=())
def pgd_step_op(x: torch.Tensor, x_adv: torch.Tensor, grad: torch.Tensor, eps: float, alpha: float) -> torch.Tensor:
    """`pgd_step_triton` as an op torch.compile traces into (compiled Triton on CUDA; see _dispatch.traced_triton)."""
    _dispatch.record("pgd_step", "triton")  # eager calls, and once when a graph is traced
    return pgd_step_triton(x, x_adv, grad, eps, alpha)


@triton_op("arat::uniform_start_triton", mutates_args=())
def uniform_start_op(x: torch.Tensor, eps: float, seed: torch.Tensor) -> torch.Tensor:
    """`uniform_start_triton` as an op torch.compile traces into."""
    _dispatch.record("uniform_start", "triton")
    return uniform_start_triton(x, eps, seed)
