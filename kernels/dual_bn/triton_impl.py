"""Triton kernels for dual batch norm over a (2B, C, H, W) batch, channels-last or contiguous.

Statistics use a split reduction so the whole GPU works on them: grid (chunks, channel blocks, 2 halves), each
program sums a chunk of (sample, spatial-block) tiles of its half into fp32 partials, a finalize program per channel
block adds the partials. Sums are shifted by one sample of the channel (x[first row of the half, c, 0, 0]) so the
variance E[(x-k)^2] - E[x-k]^2 does not cancel catastrophically when |mean| >> std. Element-wise passes
(normalize, grad_x) run one program per (sample, spatial block, channel block) tile.

Kernels launch through `torch.library.wrap_triton`: directly in eager code, traced (nodes Inductor compiles) inside
the triton_ops at the end, which the public `dual_batch_norm` calls for compiled Triton on CUDA.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from .. import _dispatch
from .._layout import MAX_KERNEL_NUMEL, layout_4d, like
from .._triton_util import cdiv, next_pow2, program_target, wrap_triton

TILE_ELEMENTS = 1024  # per program and loop iteration: 8 fp32 per thread and accumulator at 4 warps
MAX_BLOCK_C = 64
BLOCK_P = 16  # partial rows summed per finalize iteration
FINALIZE_BLOCK_C = 64
NUM_WARPS = 4


@triton.jit
def _tile_offsets(n, s, c, C, S, CHANNELS_LAST: tl.constexpr):
    """(BLOCK_S, BLOCK_C) storage offsets of x[n, c, s] for one sample n, s = h * W + w."""
    if CHANNELS_LAST:
        return n * C * S + s[:, None] * C + c[None, :]
    else:
        return n * C * S + s[:, None] + c[None, :] * S


@triton.jit
def _tile_of(tile, num_s_blocks, S, c_mask, BLOCK_S: tl.constexpr):
    """Sample index, spatial indices (BLOCK_S,) and mask (BLOCK_S, BLOCK_C) of tile number `tile` within a half."""
    n = tile // num_s_blocks
    s = (tile - n * num_s_blocks) * BLOCK_S + tl.arange(0, BLOCK_S)
    return n, s, (s[:, None] < S) & c_mask[None, :]


@triton.jit
def _sum_partials(partial_ptr, half, num_chunks, c, c_mask, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Sum over chunks of a (2, num_chunks, C) fp32 partial buffer for one half: (BLOCK_C,)."""
    total = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for p0 in range(0, num_chunks, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        index = (half * num_chunks + p[:, None]) * C + c[None, :]  # (BLOCK_P, BLOCK_C)
        mask = (p[:, None] < num_chunks) & c_mask[None, :]
        total += tl.sum(tl.load(partial_ptr + index, mask=mask, other=0.0), axis=0)
    return total


@triton.jit
def _load_per_half(clean_ptr, adv_ptr, half, c, c_mask):
    """One (BLOCK_C,) fp32 vector from the clean or the adversarial parameter."""
    clean = tl.load(clean_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    adv = tl.load(adv_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    return tl.where(half == 0, clean, adv)


@triton.jit
def _stats_partial_kernel(
    x_ptr,
    sum_ptr,
    sumsq_ptr,
    B,
    C,
    S,
    num_s_blocks,
    tiles_per_prog,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    chunk, c_block, half = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c = c_block * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,)
    c_mask = c < C
    first = _tile_offsets(half * B, tl.zeros((1,), dtype=tl.int32), c, C, S, CHANNELS_LAST)  # (1, BLOCK_C)
    shift = tl.load(x_ptr + first, mask=c_mask[None, :], other=0.0).to(tl.float32)
    acc_sum = tl.zeros((BLOCK_S, BLOCK_C), dtype=tl.float32)
    acc_sumsq = tl.zeros((BLOCK_S, BLOCK_C), dtype=tl.float32)
    for i in range(tiles_per_prog):
        tile = chunk * tiles_per_prog + i
        n, s, mask = _tile_of(tile, num_s_blocks, S, c_mask, BLOCK_S)
        mask = mask & (tile < B * num_s_blocks)
        x = tl.load(x_ptr + _tile_offsets(half * B + n, s, c, C, S, CHANNELS_LAST), mask=mask, other=0.0)
        centered = tl.where(mask, x.to(tl.float32) - shift, 0.0)  # (BLOCK_S, BLOCK_C)
        acc_sum += centered
        acc_sumsq += centered * centered
    out = (half * tl.num_programs(0) + chunk) * C + c
    tl.store(sum_ptr + out, tl.sum(acc_sum, axis=0), mask=c_mask)
    tl.store(sumsq_ptr + out, tl.sum(acc_sumsq, axis=0), mask=c_mask)


@triton.jit
def _stats_finalize_kernel(
    x_ptr,
    sum_ptr,
    sumsq_ptr,
    num_chunks,
    clean_weight_ptr,
    clean_bias_ptr,
    adv_weight_ptr,
    adv_bias_ptr,
    clean_mean_ptr,
    clean_var_ptr,
    adv_mean_ptr,
    adv_var_ptr,
    mean_ptr,
    var_ptr,
    scale_ptr,
    shift_ptr,
    B,
    C,
    S,
    eps,
    TRAINING: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    eps = tl.cast(eps, tl.float32)  # Inductor passes a Python float as fp64, which tl.sqrt_rn rejects
    c_block, half = tl.program_id(0), tl.program_id(1)
    c = c_block * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,)
    c_mask = c < C
    if TRAINING:
        count = B * S * 1.0  # fp32 (B or S may be specialised to the constant 1)
        shifted_mean = _sum_partials(sum_ptr, half, num_chunks, c, c_mask, C, BLOCK_P, BLOCK_C) / count
        shifted_sumsq = _sum_partials(sumsq_ptr, half, num_chunks, c, c_mask, C, BLOCK_P, BLOCK_C)
        var = tl.maximum(shifted_sumsq / count - shifted_mean * shifted_mean, 0.0, propagate_nan=tl.PropagateNan.ALL)
        first = _tile_offsets(half * B, tl.zeros((1,), dtype=tl.int32), c, C, S, CHANNELS_LAST)  # (1, BLOCK_C)
        shift = tl.sum(tl.load(x_ptr + first, mask=c_mask[None, :], other=0.0).to(tl.float32), axis=0)
        mean = shift + shifted_mean
    else:
        mean = _load_per_half(clean_mean_ptr, adv_mean_ptr, half, c, c_mask)
        var = _load_per_half(clean_var_ptr, adv_var_ptr, half, c, c_mask)
    scale = _load_per_half(clean_weight_ptr, adv_weight_ptr, half, c, c_mask) / tl.sqrt_rn(var + eps)
    bias = _load_per_half(clean_bias_ptr, adv_bias_ptr, half, c, c_mask)
    out = half * C + c
    tl.store(mean_ptr + out, mean, mask=c_mask)
    tl.store(var_ptr + out, var, mask=c_mask)
    tl.store(scale_ptr + out, scale, mask=c_mask)
    tl.store(shift_ptr + out, bias - mean * scale, mask=c_mask)


@triton.jit
def _normalize_kernel(
    x_ptr,
    y_ptr,
    scale_ptr,
    shift_ptr,
    B,
    C,
    S,
    num_s_blocks,
    CHANNELS_LAST: tl.constexpr,
    RELU: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,)
    c_mask = c < C
    n, s, mask = _tile_of(tl.program_id(0), num_s_blocks, S, c_mask, BLOCK_S)
    half = (n >= B).to(tl.int32)
    scale = tl.load(scale_ptr + half * C + c, mask=c_mask, other=0.0)
    shift = tl.load(shift_ptr + half * C + c, mask=c_mask, other=0.0)
    offsets = _tile_offsets(n, s, c, C, S, CHANNELS_LAST)  # (BLOCK_S, BLOCK_C)
    y = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32) * scale[None, :] + shift[None, :]
    if RELU:
        y = tl.maximum(y, 0.0, propagate_nan=tl.PropagateNan.ALL)  # max.f32 would turn NaN into 0
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_tile(grad_ptr, y_ptr, offsets, mask, RELU: tl.constexpr):
    """The incoming gradient of one tile in fp32, zeroed where the fused ReLU was off (y <= 0; a NaN y lets it
    through, as torch's threshold_backward does)."""
    grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        y = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        grad = tl.where(y <= 0, 0.0, grad)
    return grad


@triton.jit
def _backward_partial_kernel(
    grad_ptr,
    x_ptr,
    y_ptr,
    mean_ptr,
    sum_g_ptr,
    sum_gx_ptr,
    B,
    C,
    S,
    num_s_blocks,
    tiles_per_prog,
    CHANNELS_LAST: tl.constexpr,
    RELU: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    chunk, c_block, half = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c = c_block * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,)
    c_mask = c < C
    mean = tl.load(mean_ptr + half * C + c, mask=c_mask, other=0.0)
    acc_g = tl.zeros((BLOCK_S, BLOCK_C), dtype=tl.float32)
    acc_gx = tl.zeros((BLOCK_S, BLOCK_C), dtype=tl.float32)
    for i in range(tiles_per_prog):
        tile = chunk * tiles_per_prog + i
        n, s, mask = _tile_of(tile, num_s_blocks, S, c_mask, BLOCK_S)
        mask = mask & (tile < B * num_s_blocks)
        offsets = _tile_offsets(half * B + n, s, c, C, S, CHANNELS_LAST)
        grad = _grad_tile(grad_ptr, y_ptr, offsets, mask, RELU)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        acc_g += grad
        acc_gx += grad * tl.where(mask, x - mean[None, :], 0.0)
    out = (half * tl.num_programs(0) + chunk) * C + c
    tl.store(sum_g_ptr + out, tl.sum(acc_g, axis=0), mask=c_mask)
    tl.store(sum_gx_ptr + out, tl.sum(acc_gx, axis=0), mask=c_mask)


@triton.jit
def _backward_finalize_kernel(
    sum_g_ptr,
    sum_gx_ptr,
    num_chunks,
    var_ptr,
    clean_weight_ptr,
    adv_weight_ptr,
    grad_weight_ptr,
    grad_bias_ptr,
    coef_ptr,
    B,
    C,
    S,
    eps,
    TRAINING: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    eps = tl.cast(eps, tl.float32)  # fp64 when Inductor launches it (see _stats_finalize_kernel)
    c_block, half = tl.program_id(0), tl.program_id(1)
    c = c_block * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,)
    c_mask = c < C
    out = half * C + c
    invstd = 1.0 / tl.sqrt_rn(tl.load(var_ptr + out, mask=c_mask, other=1.0) + eps)
    grad_bias = _sum_partials(sum_g_ptr, half, num_chunks, c, c_mask, C, BLOCK_P, BLOCK_C)
    grad_weight = _sum_partials(sum_gx_ptr, half, num_chunks, c, c_mask, C, BLOCK_P, BLOCK_C) * invstd
    scale = _load_per_half(clean_weight_ptr, adv_weight_ptr, half, c, c_mask) * invstd
    coef_x = tl.zeros((BLOCK_C,), dtype=tl.float32)
    coef_b = tl.zeros((BLOCK_C,), dtype=tl.float32)
    if TRAINING:  # the batch statistics depend on x: grad_x = scale * (g - mean(g) - xhat * mean(g * xhat))
        count = B * S * 1.0  # fp32 (B or S may be specialised to the constant 1)
        coef_x = -scale * invstd * grad_weight / count
        coef_b = -scale * grad_bias / count
    tl.store(grad_weight_ptr + out, grad_weight, mask=c_mask)
    tl.store(grad_bias_ptr + out, grad_bias, mask=c_mask)
    tl.store(coef_ptr + out, scale, mask=c_mask)  # coef (3, 2, C): grad, centered x, constant
    tl.store(coef_ptr + 2 * C + out, coef_x, mask=c_mask)
    tl.store(coef_ptr + 4 * C + out, coef_b, mask=c_mask)


@triton.jit
def _backward_dx_kernel(
    grad_ptr,
    x_ptr,
    y_ptr,
    mean_ptr,
    coef_ptr,
    dx_ptr,
    B,
    C,
    S,
    num_s_blocks,
    TRAINING: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    RELU: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,)
    c_mask = c < C
    n, s, mask = _tile_of(tl.program_id(0), num_s_blocks, S, c_mask, BLOCK_S)
    stat = (n >= B).to(tl.int32) * C + c
    coef_g = tl.load(coef_ptr + stat, mask=c_mask, other=0.0)[None, :]
    offsets = _tile_offsets(n, s, c, C, S, CHANNELS_LAST)  # (BLOCK_S, BLOCK_C)
    grad = _grad_tile(grad_ptr, y_ptr, offsets, mask, RELU)
    if TRAINING:  # the batch statistics' terms
        mean = tl.load(mean_ptr + stat, mask=c_mask, other=0.0)[None, :]
        coef_x = tl.load(coef_ptr + 2 * C + stat, mask=c_mask, other=0.0)[None, :]
        coef_b = tl.load(coef_ptr + 4 * C + stat, mask=c_mask, other=0.0)[None, :]
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dx = coef_g * grad + coef_x * (x - mean) + coef_b
    else:  # running statistics are constants: x is not read (0 * x would make a NaN input's gradient NaN, not torch's)
        dx = coef_g * grad
    tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class Plan:
    """Tiling of one (2B, C, S) batch: tiles of BLOCK_S x BLOCK_C, reductions split into `num_chunks` per half."""

    half: int
    channels: int
    spatial: int
    channels_last: bool
    block_s: int
    block_c: int
    num_s_blocks: int
    c_blocks: int
    tiles_per_prog: int
    num_chunks: int


def tile_shape(channels: int, spatial: int, channels_last: bool) -> tuple[int, int]:
    """(BLOCK_S, BLOCK_C): the block follows the contiguous axis (channels for channels-last, space otherwise)."""
    if channels_last:
        block_c = min(next_pow2(channels), MAX_BLOCK_C)
        return min(next_pow2(spatial), TILE_ELEMENTS // block_c), block_c
    block_s = min(next_pow2(spatial), TILE_ELEMENTS // 8)
    return block_s, min(next_pow2(channels), MAX_BLOCK_C, TILE_ELEMENTS // block_s)


def plan(x: torch.Tensor) -> Plan:
    shape, channels_last, target = x.shape, layout_4d(x) == "channels_last", program_target(x.device)
    if all(type(d) is int for d in shape):  # a fixed shape (not a SymInt, which cannot be a cache key)
        return _cached_plan(tuple(shape), channels_last, target)
    return make_plan(shape, channels_last, target)


@functools.lru_cache(maxsize=512)
def _cached_plan(shape: tuple[int, ...], channels_last: bool, target_programs: int) -> Plan:
    """make_plan once per (shape, layout, device size): an eager step asks for the same few dozen plans each time."""
    return make_plan(shape, channels_last, target_programs)


def make_plan(shape, channels_last: bool, target_programs: int) -> Plan:
    """Tiles from `tile_shape`; each half's reduction is split into chunks so ~target_programs programs run."""
    batch, channels, height, width = shape
    half, spatial = batch // 2, height * width
    block_s, block_c = tile_shape(channels, spatial, channels_last)
    num_s_blocks, c_blocks = cdiv(spatial, block_s), cdiv(channels, block_c)
    tiles = half * num_s_blocks
    wanted_chunks = max(1, min(tiles, cdiv(target_programs, 2 * c_blocks)))
    tiles_per_prog = cdiv(tiles, wanted_chunks)
    num_chunks = cdiv(tiles, tiles_per_prog)
    return Plan(
        half, channels, spatial, channels_last, block_s, block_c, num_s_blocks, c_blocks, tiles_per_prog, num_chunks
    )


def dual_bn_forward_triton(x, weight, bias, running_mean, running_var, training: bool, eps: float, relu: bool):
    """Same contract as reference.dual_bn_forward_reference: (y like x, mean (2, C), biased var (2, C))."""
    assert layout_4d(x) is not None and x.numel() <= MAX_KERNEL_NUMEL and x.shape[0] % 2 == 0
    p = plan(x)
    # separate buffers, not views of one: each view is one more op per call, dispatched eagerly
    mean, var, scale, shift = (torch.empty((2, p.channels), device=x.device, dtype=torch.float32) for _ in range(4))
    partial = [torch.empty((2, p.num_chunks, p.channels), device=x.device, dtype=torch.float32) for _ in range(2)]
    if training:
        wrap_triton(_stats_partial_kernel)[(p.num_chunks, p.c_blocks, 2)](
            x,
            partial[0],
            partial[1],
            p.half,
            p.channels,
            p.spatial,
            p.num_s_blocks,
            p.tiles_per_prog,
            CHANNELS_LAST=p.channels_last,
            BLOCK_S=p.block_s,
            BLOCK_C=p.block_c,
            num_warps=NUM_WARPS,
        )
    block_cf = min(next_pow2(p.channels), FINALIZE_BLOCK_C)
    params = (weight[0], bias[0], weight[1], bias[1], running_mean[0], running_var[0], running_mean[1], running_var[1])
    wrap_triton(_stats_finalize_kernel)[(cdiv(p.channels, block_cf), 2)](
        x,
        partial[0],
        partial[1],
        p.num_chunks,
        *params,
        mean,
        var,
        scale,
        shift,
        p.half,
        p.channels,
        p.spatial,
        float(eps),
        TRAINING=training,
        CHANNELS_LAST=p.channels_last,
        BLOCK_P=BLOCK_P,
        BLOCK_C=block_cf,
        num_warps=NUM_WARPS,
    )
    y = torch.empty_like(x)
    wrap_triton(_normalize_kernel)[(2 * p.half * p.num_s_blocks, p.c_blocks)](
        x,
        y,
        scale,
        shift,
        p.half,
        p.channels,
        p.spatial,
        p.num_s_blocks,
        CHANNELS_LAST=p.channels_last,
        RELU=relu,
        BLOCK_S=p.block_s,
        BLOCK_C=p.block_c,
        num_warps=NUM_WARPS,
    )
    return y, mean, var


def dual_bn_backward_triton(grad_y, x, y, weight, mean, var, training: bool, eps: float, relu: bool):
    """Same contract as reference.dual_bn_backward_reference; grad_y has x's strides, y is needed when relu."""
    assert grad_y.stride() == x.stride() and (not relu or y.stride() == x.stride())
    p = plan(x)
    y_or_dummy = y if relu else x  # RELU=False never reads it
    partial = [torch.empty((2, p.num_chunks, p.channels), device=x.device, dtype=torch.float32) for _ in range(2)]
    wrap_triton(_backward_partial_kernel)[(p.num_chunks, p.c_blocks, 2)](
        grad_y,
        x,
        y_or_dummy,
        mean,
        partial[0],
        partial[1],
        p.half,
        p.channels,
        p.spatial,
        p.num_s_blocks,
        p.tiles_per_prog,
        CHANNELS_LAST=p.channels_last,
        RELU=relu,
        BLOCK_S=p.block_s,
        BLOCK_C=p.block_c,
        num_warps=NUM_WARPS,
    )
    grad_weight, grad_bias = (torch.empty((2, p.channels), device=x.device, dtype=torch.float32) for _ in range(2))
    coef = torch.empty((3, 2, p.channels), device=x.device, dtype=torch.float32)
    block_cf = min(next_pow2(p.channels), FINALIZE_BLOCK_C)
    wrap_triton(_backward_finalize_kernel)[(cdiv(p.channels, block_cf), 2)](
        partial[0],
        partial[1],
        p.num_chunks,
        var,
        weight[0],
        weight[1],
        grad_weight,
        grad_bias,
        coef,
        p.half,
        p.channels,
        p.spatial,
        float(eps),
        TRAINING=training,
        BLOCK_P=BLOCK_P,
        BLOCK_C=block_cf,
        num_warps=NUM_WARPS,
    )
    grad_x = torch.empty_like(x)
    wrap_triton(_backward_dx_kernel)[(2 * p.half * p.num_s_blocks, p.c_blocks)](
        grad_y,
        x,
        y_or_dummy,
        mean,
        coef,
        grad_x,
        p.half,
        p.channels,
        p.spatial,
        p.num_s_blocks,
        TRAINING=training,
        CHANNELS_LAST=p.channels_last,
        RELU=relu,
        BLOCK_S=p.block_s,
        BLOCK_C=p.block_c,
        num_warps=NUM_WARPS,
    )
    return grad_x, grad_weight, grad_bias


@triton_op("arat::dual_batch_norm_triton", mutates_args=())
def dual_bn_op(
    x: torch.Tensor,
    clean_weight: torch.Tensor,
    clean_bias: torch.Tensor,
    adv_weight: torch.Tensor,
    adv_bias: torch.Tensor,
    clean_running_mean: torch.Tensor,
    clean_running_var: torch.Tensor,
    adv_running_mean: torch.Tensor,
    adv_running_var: torch.Tensor,
    training: bool,
    eps: float,
    relu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`arat::dual_batch_norm` (same schema and contract) as an op torch.compile traces into."""
    _dispatch.record("dual_batch_norm", "triton")  # eager calls, and once when a graph is traced
    weight, bias = (clean_weight, adv_weight), (clean_bias, adv_bias)
    running_mean, running_var = (clean_running_mean, adv_running_mean), (clean_running_var, adv_running_var)
    return dual_bn_forward_triton(x, weight, bias, running_mean, running_var, training, eps, relu)


@triton_op("arat::dual_batch_norm_backward_triton", mutates_args=())
def dual_bn_backward_op(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor | None,
    clean_weight: torch.Tensor,
    adv_weight: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    training: bool,
    eps: float,
    relu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`arat::dual_batch_norm_backward` (same schema and contract) as an op torch.compile traces into."""
    _dispatch.record("dual_batch_norm_backward", "triton")
    weight = (clean_weight, adv_weight)
    return dual_bn_backward_triton(like(grad_y, x), x, y, weight, mean, var, training, eps, relu)


def _register_autograd() -> None:
    from .op import autograd_backward, autograd_setup  # op.py is loaded first (it imports this module lazily)

    dual_bn_op.register_autograd(autograd_backward(dual_bn_backward_op), setup_context=autograd_setup)


_register_autograd()
