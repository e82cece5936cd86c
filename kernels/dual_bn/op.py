"""The registered ops `arat::dual_batch_norm` (+ its backward op) and the public `dual_batch_norm`.

The forward op is functional: it returns (y, mean, var) and the public wrapper updates the running buffers in place
afterwards. torch.library refuses an autograd formula on an op that mutates its inputs, and the update is a few
C-element foreach ops (fused by torch.compile), so keeping it outside costs nothing measurable. On CUDA with compiled
Triton the public function calls the triton_op variants instead (`arat::dual_batch_norm_triton` and its backward,
in triton_impl.py, with this autograd formula), whose kernel launches torch.compile sees.
"""

from __future__ import annotations

import torch

from .. import _dispatch
from .._layout import FLOAT_DTYPES, MAX_KERNEL_NUMEL, layout_4d, like
from .reference import dual_bn_backward_reference, dual_bn_forward_reference


@torch.library.custom_op("arat::dual_batch_norm", mutates_args=())
def _dual_bn_op(
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
    params = (clean_weight, clean_bias, adv_weight, adv_bias)
    buffers = (clean_running_mean, clean_running_var, adv_running_mean, adv_running_var)
    backend = _select("dual_batch_norm", x, (), params + buffers)
    weight, bias = (clean_weight, adv_weight), (clean_bias, adv_bias)
    running_mean, running_var = (clean_running_mean, adv_running_mean), (clean_running_var, adv_running_var)
    if backend == "native":
        return tuple(torch.ops.arat_native.dual_bn_forward(x, *params, *buffers, training, eps, relu))
    if backend == "triton":
        from .._triton_util import direct_launches
        from .triton_impl import dual_bn_forward_triton

        with direct_launches():
            return dual_bn_forward_triton(x, weight, bias, running_mean, running_var, training, eps, relu)
    return dual_bn_forward_reference(x, weight, bias, running_mean, running_var, training, eps, relu)


@_dual_bn_op.register_fake
def _(x, clean_weight, clean_bias, adv_weight, adv_bias, crm, crv, arm, arv, training, eps, relu):
    stats = x.new_empty((2, x.shape[1]), dtype=torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("arat::dual_batch_norm_backward", mutates_args=())
def _dual_bn_backward_op(
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
    """(grad_x like x, grad_weight (2, C) fp32, grad_bias (2, C) fp32): row 0 clean, row 1 adversarial."""
    maps = (grad_y,) if y is None else (grad_y, y)
    backend = _select("dual_batch_norm_backward", x, maps, (clean_weight, adv_weight, mean, var))
    if backend == "native":
        args = (like(grad_y.to(x.dtype), x), x, y, clean_weight, adv_weight, mean, var, training, eps, relu)
        return tuple(torch.ops.arat_native.dual_bn_backward(*args))
    weight = (clean_weight, adv_weight)
    if backend == "triton":
        from .._triton_util import direct_launches
        from .triton_impl import dual_bn_backward_triton

        with direct_launches():
            return dual_bn_backward_triton(like(grad_y, x), x, y, weight, mean, var, training, eps, relu)
    return dual_bn_backward_reference(grad_y, x, y, weight, mean, var, training, eps, relu)


@_dual_bn_backward_op.register_fake
def _(grad_y, x, y, clean_weight, adv_weight, mean, var, training, eps, relu):
    return torch.empty_like(x), torch.empty_like(mean), torch.empty_like(mean)


def autograd_setup(ctx, inputs, output):
    x, clean_weight, _, adv_weight, *_, training, eps, relu = inputs
    y, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    ctx.save_for_backward(x, y if relu else None, clean_weight, adv_weight, mean, var)
    ctx.training, ctx.eps, ctx.relu = training, eps, relu


def autograd_backward(backward_op):
    """The autograd formula of a dual-BN forward op whose backward op (same schema) is `backward_op`."""

    def backward(ctx, grad_y, _grad_mean, _grad_var):
        x, y, clean_weight, adv_weight, mean, var = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = backward_op(
            grad_y, x, y, clean_weight, adv_weight, mean, var, ctx.training, ctx.eps, ctx.relu
        )
        clean, adv = clean_weight.dtype, adv_weight.dtype
        param_grads = (grad_weight[0].to(clean), grad_bias[0].to(clean), grad_weight[1].to(adv), grad_bias[1].to(adv))
        return (grad_x, *param_grads, None, None, None, None, None, None, None)

    return backward


_dual_bn_op.register_autograd(autograd_backward(_dual_bn_backward_op), setup_context=autograd_setup)


def dual_batch_norm(
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
    """Batch norm of x[:B] with the clean set and of x[B:] with the adversarial set, in one op; ReLU optional.

    Same result, gradients and running-buffer updates as `dual_batch_norm_reference` (two F.batch_norm calls); the
    two sets may be the same tensors (then the buffers are updated twice, clean first).
    """
    params = (clean_weight, clean_bias, adv_weight, adv_bias)
    buffers = (clean_running_mean, clean_running_var, adv_running_mean, adv_running_var)
    _check_inputs(x, params + buffers, training, momentum, eps)
    if _dispatch.traced_triton(x.device, lambda: _kernel_reason(x, (), params + buffers)):
        from .triton_impl import dual_bn_op

        y, mean, var = dual_bn_op(x, *params, *buffers, training, eps, relu)
    else:
        y, mean, var = _dual_bn_op(x, *params, *buffers, training, eps, relu)
    if training:
        count = x.numel() // x.shape[1] // 2
        _update_running_stats(buffers, mean, var * (count / (count - 1)), momentum)
    return y


def _update_running_stats(buffers, mean: torch.Tensor, unbiased_var: torch.Tensor, momentum: float) -> None:
    """running = (1 - momentum) * running + momentum * batch, clean then adv (shared buffers see both, in order)."""
    with torch.no_grad():
        for half, (running_mean, running_var) in enumerate((buffers[:2], buffers[2:])):
            targets = [running_mean, running_var]
            torch._foreach_mul_(targets, 1.0 - momentum)
            torch._foreach_add_(
                targets,
                [mean.select(0, half).to(running_mean.dtype), unbiased_var.select(0, half).to(running_var.dtype)],
                alpha=momentum,
            )  # select, not [half]: Python indexing takes a device guard (tests/kernels/inductor_sm90.py has none)


def _check_inputs(x: torch.Tensor, tensors: tuple[torch.Tensor, ...], training: bool, momentum: float, eps: float):
    if any(not isinstance(t, torch.Tensor) for t in tensors):
        raise ValueError(
            "dual_batch_norm needs affine parameters and running statistics for both sets (BatchNorm2d "
            "with affine=True, track_running_stats=True)"
        )
    if x.dim() < 2 or x.shape[0] % 2:
        raise ValueError(f"dual_batch_norm needs a (2B, C, ...) batch, clean rows first; got shape {tuple(x.shape)}")
    if any(t.shape != (x.shape[1],) for t in tensors):
        raise ValueError(f"dual_batch_norm needs weights, biases and running stats of shape ({x.shape[1]},)")
    if training and x.numel() // x.shape[1] // 2 < 2:
        raise ValueError("dual_batch_norm in training needs more than one value per channel in each half")
    if momentum is None or not 0.0 <= momentum <= 1.0 or eps <= 0:
        raise ValueError(
            f"dual_batch_norm needs a float 0 <= momentum <= 1 (not None) and eps > 0, got {momentum}, {eps}"
        )


def _select(op: str, x: torch.Tensor, maps: tuple[torch.Tensor, ...], stats: tuple[torch.Tensor, ...]) -> str:
    """The backend for x with same-shape tensors `maps` (grad_y, y) and per-channel tensors `stats`."""
    common = _kernel_reason(x, maps, stats)
    triton_reason = _dispatch.triton_unsupported_device(x.device) or common
    native_reason = _dispatch.native_unsupported_device(x.device) or common
    if native_reason is None and any(t.dtype != torch.float32 for t in stats):
        native_reason = "the native kernel needs float32 parameters and statistics"
    return _dispatch.select_backend(op, x.device, triton_reason, native_reason)


def _kernel_reason(x: torch.Tensor, maps: tuple[torch.Tensor, ...], stats: tuple[torch.Tensor, ...]) -> str | None:
    """Why the fused kernels (Triton and native) cannot take this call; None when they can."""
    if layout_4d(x) is None:
        return f"x must be 4-D and contiguous or channels-last, got shape {tuple(x.shape)} strides {x.stride()}"
    if any(t.dtype not in FLOAT_DTYPES for t in (x, *maps, *stats)):
        return "x, parameters and statistics must be float32/bfloat16/float16"
    if any(t.device != x.device for t in (*maps, *stats)):
        return "all tensors must be on x's device"
    if any(not t.is_contiguous() for t in stats):
        return "parameters and statistics must be contiguous"
    if x.numel() == 0:  # nothing to launch (the kernels' plan divides by the tiles)
        return "an empty batch"
    if x.numel() > MAX_KERNEL_NUMEL:
        return f"{x.numel()} elements exceed the kernels' int32 indexing"
    return None
