"""The PGD update and random start, with a hook for the fused kernels (engine.perf installs them)."""

from __future__ import annotations

from collections.abc import Callable

import torch

Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, float], torch.Tensor]


def pgd_step_reference(x: torch.Tensor, x_adv: torch.Tensor, grad: torch.Tensor, eps: float, alpha: float):
    """clamp(clamp(x_adv + alpha * sign(grad), x - eps, x + eps), 0, 1); never writes to its inputs.

    The step is selected by the gradient's sign, not multiplied by it, as the fused kernels do: a NaN or zero
    gradient does not move (alpha * sign would give NaN at alpha = inf, or for a NaN gradient on CUDA). A bf16/fp16
    x_adv is stepped in float32 and rounded once to its dtype, as the kernels do."""
    if x_adv.dtype != torch.float32:
        return pgd_step_reference(x.float(), x_adv.float(), grad.float(), eps, alpha).to(x_adv.dtype)
    stepped = x_adv + torch.where(grad > 0, alpha, torch.where(grad < 0, -alpha, 0.0))
    return torch.clamp(torch.minimum(torch.maximum(stepped, x - eps), x + eps), 0, 1)


_step: Step = pgd_step_reference


def set_step_kernel(kernel: Step | None) -> None:
    global _step
    _step = kernel or pgd_step_reference


def pgd_step(x: torch.Tensor, x_adv: torch.Tensor, grad: torch.Tensor, eps: float, alpha: float) -> torch.Tensor:
    return _step(x, x_adv, grad, eps, alpha)


def noise_like(x: torch.Tensor, kind: str) -> torch.Tensor:
    """U(-1, 1) or N(0, 1) noise shaped like x, drawn in logical (contiguous) order so that the same seed gives
    the same noise whatever x's memory format; returned in x's memory format."""
    draw = torch.rand if kind == "uniform" else torch.randn
    noise = draw(x.shape, device=x.device, dtype=x.dtype)
    noise = noise.mul_(2).sub_(1) if kind == "uniform" else noise
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    return noise.contiguous(memory_format=torch.channels_last) if channels_last else noise


def random_start(x: torch.Tensor, eps: float, kind: str) -> torch.Tensor:
    """A new starting point: uniform in the eps-ball (clamped to [0, 1]), x + 0.001 * N(0, 1) unclamped as in the
    published TRADES and MART codes (METHOD 6; the first PGD step projects into [0, 1]), or x."""
    if kind == "uniform":
        return torch.clamp(x + eps * noise_like(x, "uniform"), 0, 1)
    if kind == "gaussian":
        return x + 0.001 * noise_like(x, "gaussian")
    return x.clone()
