"""Connects the fused ops of `kernels/` to the engine's hook points (the PGD step and Split-BN's dual branch).

Eligibility is checked per call; an ineligible call (a BN with cumulative-average momentum None, or without running
statistics) takes the plain-torch path explicitly.
"""

from __future__ import annotations

import torch
from torch import nn

from .attacks import set_step_kernel
from .models import set_dual_kernel
from .models.splitbn import dual_bn_reference


def fused_dual_bn(x: torch.Tensor, clean: nn.BatchNorm2d, adv: nn.BatchNorm2d, relu: bool) -> torch.Tensor:
    import kernels

    eligible = (  # one momentum and eps for both halves; affine parameters and running statistics in each
        x.dim() == 4
        and all(bn.track_running_stats and bn.affine and bn.momentum is not None for bn in (clean, adv))
        and (clean.momentum, clean.eps) == (adv.momentum, adv.eps)
    )
    if not eligible or clean.training != adv.training:
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
    active = [name for name, info in kernels.available_backends().items() if info["active"]]
    return "fused(" + "+".join(active) + ")" + ("" if dual else " pgd_step only"), kernels.pgd_step
