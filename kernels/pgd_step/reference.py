"""The spec of the fused PGD ops in plain torch: the CPU path and the test oracle.

Both ops compute in float32 and round once to the output dtype, so bf16/fp16 results differ from doing the
arithmetic in bf16 by at most one rounding. The output has x_adv's (resp. x's) dtype and memory format.
"""

from __future__ import annotations

import torch


def pgd_step_reference(x: torch.Tensor, x_adv: torch.Tensor, grad: torch.Tensor, eps: float, alpha: float):
    """clamp(clamp(x_adv + alpha * sign(grad), x - eps, x + eps), 0, 1) with sign(0) = sign(NaN) = 0.

    sign(NaN) = 0 is what torch.sign gives on CPU; comparing against 0 makes it so on every device. The step is
    selected, never multiplied (alpha * sign would give inf * 0 = NaN at alpha = inf where the gradient is 0), as the
    Triton and C++ kernels do. NaN in x_adv propagates to the output (torch.clamp does).
    """
    x32, g = x.float(), grad.float()
    moved = x_adv.float() + torch.where(g > 0, alpha, torch.where(g < 0, -alpha, 0.0))
    projected = torch.clamp(torch.clamp(moved, x32 - eps, x32 + eps), 0.0, 1.0)
    return torch.empty_like(x_adv).copy_(projected)


def uniform_start_reference(x: torch.Tensor, eps: float, seed: torch.Tensor) -> torch.Tensor:
    """clamp(x + U(-eps, eps), 0, 1) with noise from torch.rand seeded by `seed` (a one-element int64 tensor).

    Same seed, same noise on this backend; the Triton kernel draws from Philox instead, so the two backends agree in
    distribution only.
    """
    generator = torch.Generator(device=x.device).manual_seed(int(seed.reshape(-1)[0]))
    uniform = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32)  # [0, 1)
    noisy = x.float() + (2.0 * uniform - 1.0) * eps
    return torch.empty_like(x).copy_(torch.clamp(noisy, 0.0, 1.0))
