"""Memory-format helpers: the fused kernels index flat storage, so their operands must share one dense layout."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_KERNEL_NUMEL = 2**31 - 2**20  # the kernels index with int32, with room for the last block


def is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: the storage holds exactly numel elements (contiguous in some dimension order)."""
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last) or _dense_by_strides(t)


def _dense_by_strides(t: torch.Tensor) -> bool:
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride(), strict=True), key=lambda p: p[1]):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def like(t: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
    """`t` with the strides of the dense `template` (a copy only when the layouts differ); another shape is an error
    (copy_'s), never the first elements of a larger `t` read as if they were all of it."""
    if t.stride() == template.stride() and t.shape == template.shape:
        return t
    return torch.empty_like(template, dtype=t.dtype).copy_(t)


def layout_4d(x: torch.Tensor) -> str | None:
    """'channels_last' or 'contiguous' for a 4-D tensor the kernels can index, None otherwise."""
    if x.dim() != 4:
        return None
    if x.is_contiguous():
        return "contiguous"  # also true for (N, C, 1, 1) or C == 1, which is both
    if x.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return None
