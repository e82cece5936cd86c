"""The registered ops `arat::pgd_step` and `arat::uniform_start` and their backend dispatch.

Both run under no_grad inside the attack loop, so neither has an autograd formula (a backward through them raises);
both have fake impls, so they trace under torch.compile(fullgraph=True). On CUDA with compiled Triton the public
functions call the triton_op variants instead (`arat::pgd_step_triton`, `arat::uniform_start_triton`, in
triton_impl.py), whose kernel launches torch.compile sees.
"""

from __future__ import annotations

import torch

from .. import _dispatch
from .._layout import FLOAT_DTYPES, MAX_KERNEL_NUMEL, is_dense, like
from .reference import pgd_step_reference, uniform_start_reference


@torch.library.custom_op("arat::pgd_step", mutates_args=())
def _pgd_step_op(x: torch.Tensor, x_adv: torch.Tensor, grad: torch.Tensor, eps: float, alpha: float) -> torch.Tensor:
    backend = _dispatch.select_backend(
        "pgd_step", x_adv.device, _triton_reason(x_adv, x, grad), _native_reason(x_adv, x, grad)
    )
    if backend == "reference":
        return pgd_step_reference(x, x_adv, grad, eps, alpha)
    x, grad = like(x, x_adv), like(grad, x_adv)
    if backend == "native":
        return torch.ops.arat_native.pgd_step(x, x_adv, grad, eps, alpha)
    from .._triton_util import direct_launches
    from .triton_impl import pgd_step_triton

    with direct_launches():
        return pgd_step_triton(x, x_adv, grad, eps, alpha)


@_pgd_step_op.register_fake
def _(x, x_adv, grad, eps, alpha):
    return torch.empty_like(x_adv)


@torch.library.custom_op("arat::uniform_start", mutates_args=())
def _uniform_start_op(x: torch.Tensor, eps: float, seed: torch.Tensor) -> torch.Tensor:
    reason = _triton_reason(x)
    backend = _dispatch.select_backend("uniform_start", x.device, reason, _dispatch.NO_NATIVE_KERNEL)
    if backend == "triton":
        from .._triton_util import direct_launches
        from .triton_impl import uniform_start_triton

        with direct_launches():
            return uniform_start_triton(x, eps, seed.to(x.device))
    return uniform_start_reference(x, eps, seed)


@_uniform_start_op.register_fake
def _(x, eps, seed):
    return torch.empty_like(x)


def pgd_step(x: torch.Tensor, x_adv: torch.Tensor, grad: torch.Tensor, eps: float, alpha: float) -> torch.Tensor:
    """clamp(clamp(x_adv + alpha * sign(grad), x - eps, x + eps), 0, 1) in one pass; a new tensor like x_adv."""
    if not (x.shape == x_adv.shape == grad.shape):
        raise ValueError(f"pgd_step needs x, x_adv, grad of one shape, got {x.shape}, {x_adv.shape}, {grad.shape}")
    if eps < 0 or alpha < 0:
        raise ValueError(f"pgd_step needs eps >= 0 and alpha >= 0, got eps={eps}, alpha={alpha}")
    if _dispatch.traced_triton(x_adv.device, lambda: _common_reason(x_adv, x, grad)):
        from .triton_impl import pgd_step_op

        return pgd_step_op(like(x, x_adv), x_adv, like(grad, x_adv), float(eps), float(alpha))
    return _pgd_step_op(x, x_adv, grad, float(eps), float(alpha))


def uniform_start(x: torch.Tensor, eps: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """clamp(x + U(-eps, eps), 0, 1) in one pass; a new tensor like x.

    One int64 seed is drawn from `generator` on its device (torch's default generator of x's device when None), so
    runs repeat under torch.manual_seed; each backend expands the seed with its own generator (Philox in Triton,
    torch.rand in the reference), so backends agree in distribution only.
    """
    if eps < 0:
        raise ValueError(f"uniform_start needs eps >= 0, got {eps}")
    device = x.device if generator is None else generator.device  # (a CPU generator for CUDA images: drawn there)
    seed = torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64, generator=generator).to(x.device)
    if _dispatch.traced_triton(x.device, lambda: _common_reason(x)):
        from .triton_impl import uniform_start_op

        return uniform_start_op(x, float(eps), seed)
    return _uniform_start_op(x, float(eps), seed)


def _triton_reason(template: torch.Tensor, *others: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot take these tensors (the output is laid out like `template`); None if they can."""
    return _dispatch.triton_unsupported_device(template.device) or _common_reason(template, *others)


def _native_reason(template: torch.Tensor, *others: torch.Tensor) -> str | None:
    device_reason = _dispatch.native_unsupported_device(template.device)
    if device_reason is not None:
        return device_reason
    if any(t.dtype != template.dtype for t in others):
        return "the native kernel needs x, x_adv and grad in one dtype"
    return _common_reason(template, *others)


def _common_reason(template: torch.Tensor, *others: torch.Tensor) -> str | None:
    tensors = (template, *others)
    if any(t.device != template.device for t in others):
        return "tensors are on different devices"
    if any(t.dtype not in FLOAT_DTYPES for t in tensors):
        return f"dtypes {[t.dtype for t in tensors]} are not all float32/bfloat16/float16"
    if not is_dense(template):
        return "the output template is not dense (a strided view); pass a contiguous tensor"
    if template.numel() > MAX_KERNEL_NUMEL:
        return f"{template.numel()} elements exceed the kernels' int32 indexing ({MAX_KERNEL_NUMEL})"
    return None
