"""Batch statistics over every DDP rank's images (`dist.sync_bn`): METHOD's BN batch of 128 when 8 processes take
16 images each (without it, each rank normalizes over its own 16).

The engine's BatchNorms are `SyncableBatchNorm{1,2}d`, plain `nn.BatchNorm{1,2}d` (same parameters, buffers and
state_dict) that, once `set_sync_bn` marks them and while in train mode, normalize with the mean and variance of the
whole global batch: each rank's per-channel sums (x, x^2, count) are summed over the ranks by one differentiable
all-reduce (its backward sums the gradients too, as torch's SyncBatchNorm does), and the running statistics take
the global batch's mean and unbiased variance, the same on every rank. Eval mode (the running statistics) is
untouched. Autograd keeps fp32 copies of each BN's input (about 6x the memory cuDNN's BN keeps): harmless at
METHOD's 16 images per GPU, more at large per-GPU batches. Works on gloo (CPU) and NCCL (not yet run on GPUs);
torch's own nn.SyncBatchNorm refuses CPU tensors and takes no branch argument. Where it synchronizes (torchrun, more
than one rank; one process marks nothing), uncompiled and uncaptured only (compile's and graphs' auto resolve off,
on is refused), and not under fp16 (each rank's attack would scale its loss by its own power of two, and the summed
input gradients would mix the scales).
"""

from __future__ import annotations

import torch
from torch import nn


class _SumOverRanks(torch.autograd.Function):
    """The element-wise sum over the ranks; its gradient, the sum of every rank's gradient (each rank's loss
    depends on every rank's statistics)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        total = t.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        total = grad.clone()
        dist.all_reduce(total)
        return total


def sync_batch_norm(x: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """Train-mode batch norm of `x` (N, C, ...) with `bn`'s affine parameters over every rank's batch; updates
    `bn`'s running statistics with the global batch's (momentum None: the cumulative average)."""
    channels = x.shape[1]
    dims = [d for d in range(x.dim()) if d != 1]
    shape = (1, channels) + (1,) * (x.dim() - 2)
    # sums of x - K for a K the same on every rank, near the mean once training runs (the running mean: synced,
    # equal everywhere, as every rank starts from the same network and a resume that turns the synchronization on
    # is refused): E[d^2] - E[d]^2 loses digits as (mean / std)^2 grows, which the shift keeps small
    shift = bn.running_mean.detach().float() if bn.track_running_stats else x.new_zeros(channels, dtype=torch.float)
    d = x.float() - shift.view(shape)
    count = d.new_full((1,), x.numel() // channels)
    totals = _SumOverRanks.apply(torch.cat([d.sum(dims), (d * d).sum(dims), count]))  # (2C + 1,) over ranks
    n = totals[-1]
    centred = totals[:channels] / n
    mean = shift + centred
    var = (totals[channels : 2 * channels] / n - centred * centred).clamp_min(0)  # biased, as batch norm normalizes
    if bn.track_running_stats:
        with torch.no_grad():  # device tensors throughout: no host sync
            bn.num_batches_tracked.add_(1)
            m = 1.0 / bn.num_batches_tracked.float() if bn.momentum is None else bn.momentum
            bn.running_mean.mul_(1 - m).add_(m * mean)
            bn.running_var.mul_(1 - m).add_(m * var * n / (n - 1))  # unbiased, as F.batch_norm keeps it
    y = (d - centred.view(shape)) * torch.rsqrt(var.view(shape) + bn.eps)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    return y.to(x.dtype)


def _grouped() -> bool:
    """A process group to synchronize over (gone after the run's end: a marked network then trains as plain BN)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


class _Syncable:
    sync = False  # set by set_sync_bn: under DDP, train-mode statistics over every rank's batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sync and self.training and _grouped():
            return sync_batch_norm(x, self)
        return super().forward(x)


class SyncableBatchNorm2d(_Syncable, nn.BatchNorm2d):
    """nn.BatchNorm2d that can take its batch statistics over every DDP rank (`set_sync_bn`)."""


class SyncableBatchNorm1d(_Syncable, nn.BatchNorm1d):
    """nn.BatchNorm1d that can take its batch statistics over every DDP rank (`set_sync_bn`)."""


def set_sync_bn(module: nn.Module, on: bool) -> int:
    """Mark (or unmark) every syncable BN in `module`; returns how many. Marked, the fused dual-BN kernel (which
    computes each rank's own statistics) is not used."""
    from .splitbn import set_dual_kernel

    marked = [m for m in module.modules() if isinstance(m, _Syncable)]
    for m in marked:
        m.sync = on
    if on:
        set_dual_kernel(module, None)
    return len(marked)
