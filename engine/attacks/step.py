"""The PGD update and random start, with a hook for the fused kernels (engine.perf installs them)."""

from __future__ import annotations

from collections.abc import Callable

import torch

Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, float], torch.Tensor]


def pgd_step_reference(x: torch.Tensor, x_adv: torch.Tensor, grad: torch.Tensor, eps: float, alpha: float):
    """clamp(clamp(x_adv + alpha * sign(grad), x - eps, x + eps), 0, 1); never writes to its inputs."""
    stepped = x_adv + alpha * grad.sign()
    return torch.clamp(torch.minimum(torch.maximum(stepped, x - eps), x + eps), 0, 1)


_step: Step = pgd_step_reference


def set_step_kernel(kernel: Step | None) -> None:
    global _step
    _step = kernel or pgd_step_reference


def pgd_step(x: torch.Tensor, x_adv: torch.Tensor, grad: torch.Tensor, eps: float, alpha: float) -> torch.Tensor:
    return _step(x, x_adv, grad, eps, alpha)


def random_start(x: torch.Tensor, eps: float, kind: str) -> torch.Tensor:
    """A new starting point: uniform in the eps-ball (clamped to [0, 1]), 0.001 * N(0, 1) (TRADES/MART), or x."""
    if kind == "uniform":
        return torch.clamp(x + torch.empty_like(x).uniform_(-eps, eps), 0, 1)
    if kind == "gaussian":
        return torch.clamp(x + 0.001 * torch.randn_like(x), 0, 1)
    return x.clone()
