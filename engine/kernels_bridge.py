"""Connects the fused ops of `kernels/` to the engine's hook points (the PGD step and Split-BN's dual branch).

Eligibility is checked per call; an ineligible call (a BN with cumulative-average momentum None, or without running
statistics) takes the plain-torch path explicitly.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .attacks import set_step_kernel
from .models import set_dual_kernel
from .models.splitbn import SplitBatchNorm2d, _BranchNorm, dual_bn_reference

log = logging.getLogger("kernels")


def ineligible(clean: nn.BatchNorm2d, adv: nn.BatchNorm2d) -> str | None:
    """Why the fused dual BN cannot run this Split-BN pair (None: it can): it needs one momentum (not None) and eps
    for both halves, and affine parameters and running statistics in each."""
    for name, bn in (("clean ", clean), ("adv ", adv)) if clean is not adv else (("", clean),):
        if not (bn.track_running_stats and bn.affine and bn.momentum is not None):
            return f"its {name}BN has no running statistics, no affine parameters or momentum None"
    if (clean.momentum, clean.eps) != (adv.momentum, adv.eps):
        return "its halves differ in momentum or eps"
    return None


def fused_dual_bn(x: torch.Tensor, clean: nn.BatchNorm2d, adv: nn.BatchNorm2d, relu: bool) -> torch.Tensor:
    import kernels

    # (no log here: the call is traced by torch.compile, where a log call breaks the graph; `install` says it once)
    if x.dim() != 4 or ineligible(clean, adv) or clean.training != adv.training:
        return dual_bn_reference(x, clean, adv, relu)
    y = kernels.dual_batch_norm(
        x, clean.weight, clean.bias, clean.running_mean, clean.running_var,
        adv.weight, adv.bias, adv.running_mean, adv.running_var,
        training=clean.training, momentum=clean.momentum, eps=clean.eps, relu=relu,
    )  # fmt: skip
    if clean.training:  # nn.BatchNorm2d counts its training batches; keep the same state as two separate BNs
        clean.num_batches_tracked.add_(1)
        adv.num_batches_tracked.add_(1)
    return y


def install(model: nn.Module, dual: bool = True) -> tuple[str, object]:
    """Route the PGD step and (`dual`) the dual-BN branch through the fused ops; returns (what is active, for the
    log; the PGD step installed)."""
    import kernels

    kernels.load_native()  # the optional C++ CPU library, when built
    if torch.cuda.is_available():
        kernels.load_triton_ops()  # registered before torch.compile traces the model
    set_step_kernel(kernels.pgd_step)
    set_dual_kernel(model, fused_dual_bn if dual else None)
    if dual:
        for name, layer in model.named_modules():
            if not isinstance(layer, _BranchNorm):
                continue
            pair = (layer.clean, layer.adv) if isinstance(layer, SplitBatchNorm2d) else (layer, layer)
            if why := ineligible(*pair):
                log.warning("dual BN %s runs the plain-torch reference, not the fused op: %s", name, why)
    active = [name for name, info in kernels.available_backends().items() if info["active"]]
    return "fused(" + "+".join(active) + ")" + ("" if dual else " pgd_step only"), kernels.pgd_step
