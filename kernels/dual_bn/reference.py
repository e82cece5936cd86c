"""The spec of dual batch norm in plain torch: the CPU path and the test oracle.

A batch (2B, C, *) holds a clean half (rows :B) and an adversarial half (rows B:). `dual_batch_norm_reference` is
the definition: two F.batch_norm calls (clean first, so shared running buffers are updated clean then adv) and an
optional ReLU. The functional pieces below compute the same thing without touching the running buffers; the op is
built from them: forward returns per-half batch statistics (mean, biased var), the wrapper updates the buffers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dual_batch_norm_reference(
    x: torch.Tensor,
    clean_weight: torch.Tensor,
    clean_bias: torch.Tensor,
    clean_running_mean: torch.Tensor,
    clean_running_var: torch.Tensor,
    adv_weight: torch.Tensor,
    adv_bias: torch.Tensor,
    adv_running_mean: torch.Tensor,
    adv_running_var: torch.Tensor,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    relu: bool = False,
) -> torch.Tensor:
    """torch.cat([F.batch_norm(x[:B], clean...), F.batch_norm(x[B:], adv...)]), then ReLU when asked."""
    half = x.shape[0] // 2
    clean = F.batch_norm(
        x[:half], clean_running_mean, clean_running_var, clean_weight, clean_bias, training, momentum, eps
    )
    adv = F.batch_norm(x[half:], adv_running_mean, adv_running_var, adv_weight, adv_bias, training, momentum, eps)
    y = torch.cat([clean, adv])
    return torch.relu(y) if relu else y


def dual_bn_forward_reference(
    x: torch.Tensor,
    weight: tuple[torch.Tensor, torch.Tensor],
    bias: tuple[torch.Tensor, torch.Tensor],
    running_mean: tuple[torch.Tensor, torch.Tensor],
    running_var: tuple[torch.Tensor, torch.Tensor],
    training: bool,
    eps: float,
    relu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y like x, mean (2, C) fp32, biased var (2, C) fp32); the statistics are the running ones in eval mode."""
    x32 = x.float()
    if training:
        var, mean = _batch_stats(x32)  # (2, C), (2, C)
    else:
        mean = torch.stack([running_mean[0], running_mean[1]]).float()
        var = torch.stack([running_var[0], running_var[1]]).float()
    scale = torch.stack(weight).float() * torch.rsqrt(var + eps)  # (2, C)
    shift = torch.stack(bias).float() - mean * scale
    y = x32 * _per_row(scale, x) + _per_row(shift, x)
    if relu:
        y = torch.relu(y)
    return torch.empty_like(x).copy_(y), mean, var


def dual_bn_backward_reference(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor | None,
    weight: tuple[torch.Tensor, torch.Tensor],
    mean: torch.Tensor,
    var: torch.Tensor,
    training: bool,
    eps: float,
    relu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x like x, grad_weight (2, C) fp32, grad_bias (2, C) fp32); y is the forward output, needed for ReLU."""
    grad = grad_y.float()
    if relu:
        grad = torch.where(y <= 0, 0.0, grad)  # a NaN y lets it through, as torch's threshold_backward does
    invstd = torch.rsqrt(var + eps)  # (2, C)
    centered = x.float() - _per_row(mean, x)
    grad_bias = _half_sums(grad)  # (2, C)
    grad_weight = _half_sums(grad * centered) * invstd
    scale = torch.stack(weight).float() * invstd
    grad_x = grad * _per_row(scale, x)
    if training:
        count = x.numel() // x.shape[1] // 2
        correction = grad_bias / count, grad_weight * invstd / count  # (2, C) each
        grad_x = grad_x - _per_row(scale, x) * (_per_row(correction[0], x) + centered * _per_row(correction[1], x))
    return torch.empty_like(x).copy_(grad_x), grad_weight, grad_bias


def _batch_stats(x32: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    halves = x32.unflatten(0, (2, -1))  # (2, B, C, *)
    dims = [1, *range(3, halves.dim())]
    return torch.var_mean(halves, dim=dims, correction=0)


def _half_sums(t: torch.Tensor) -> torch.Tensor:
    halves = t.unflatten(0, (2, -1))  # (2, B, C, *)
    return halves.sum(dim=[1, *range(3, halves.dim())])


def _per_row(stat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(2, C) per-half statistics broadcast to x's rows: (2B, C, 1, ...)."""
    half = x.shape[0] // 2
    expanded = stat.repeat_interleave(half, dim=0)  # (2B, C)
    return expanded.reshape(*expanded.shape, *([1] * (x.dim() - 2)))
