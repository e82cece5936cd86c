"""Convolutions as one matrix product (im2col by shifted views), for the small-image layers where a CPU's
convolution library runs far below its own matrix-product speed.

Measured on an Intel Xeon with AMX (2 threads, bf16, channels-last, batch 32, 2026-12-01): oneDNN ran ResNet-18's
layer1 convolution (64 ch, 32x32) at ~610 GFLOP/s but layer4's (512 ch, 4x4) at ~190 GFLOP/s forward and ~65
GFLOP/s for the weight gradient, while a bf16 matrix product of that convolution's size ran at ~765 GFLOP/s. Written
as a product over the k*k shifted views of the padded input (channels last: each view is a strided slice; their
concatenation is the im2col matrix), the forward, the input gradient and the weight gradient are each one matrix
product plus copies. Which layers gain depends on the CPU, so `perf.gemm_conv` is a switch (the output size at or
below which a convolution goes this way), measured by bench/train_step.py's ladder; CUDA keeps cuDNN.

A module switched here keeps its class's parameters and state_dict keys: only `_conv_forward` changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv2d_gemm(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int) -> torch.Tensor:
    """F.conv2d(x, weight, stride=stride, padding=padding) (square kernel, no dilation, one group, no bias) as
    one matrix product; the result is channels-last in memory."""
    batch, channels, height, width = x.shape
    out_channels, _, k, _ = weight.shape
    rows = (height + 2 * padding - k) // stride + 1
    cols = (width + 2 * padding - k) // stride + 1
    padded = F.pad(x, (padding,) * 4) if padding else x
    nhwc = padded.permute(0, 2, 3, 1)  # a view; contiguous when x is channels-last
    views = [
        nhwc[:, i : i + stride * (rows - 1) + 1 : stride, j : j + stride * (cols - 1) + 1 : stride, :]
        for i in range(k)
        for j in range(k)
    ]
    im2col = torch.cat(views, dim=3).reshape(batch * rows * cols, k * k * channels)
    w = weight.permute(2, 3, 1, 0).reshape(k * k * channels, out_channels)  # (i, j, c) order, as the views
    return (im2col @ w).reshape(batch, rows, cols, out_channels).permute(0, 3, 1, 2)


class GemmConv2d(nn.Conv2d):
    """An nn.Conv2d whose forward is `conv2d_gemm` (modules are switched by class, so weights stay where they are)."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = conv2d_gemm(input, weight, self.stride[0], self.padding[0])
        return out if bias is None else out + bias.to(out.dtype).view(1, -1, 1, 1)  # autocast casts conv's bias too


def gemm_capable(conv: nn.Module) -> bool:
    """Square kernel > 1, one group, no dilation, zero padding mode, equal strides and paddings."""
    return (
        isinstance(conv, nn.Conv2d)
        and conv.kernel_size[0] == conv.kernel_size[1] > 1
        and conv.groups == 1
        and conv.dilation == (1, 1)
        and conv.padding_mode == "zeros"
        and conv.stride[0] == conv.stride[1]
        and isinstance(conv.padding, tuple)
        and conv.padding[0] == conv.padding[1]
    )


def output_sizes(model: nn.Module, image_size: int) -> dict[str, tuple[int, int]]:
    """Each convolution's output (height, width) for a square input image, from a no-grad eval-mode forward of
    one blank image (eval mode: batch-norm running statistics are read, not updated)."""
    sizes: dict[str, tuple[int, int]] = {}
    hooks = [
        module.register_forward_hook(lambda m, args, out, name=name: sizes.__setitem__(name, tuple(out.shape[-2:])))
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d)
    ]
    modes = {module: module.training for module in model.modules()}
    param = next(model.parameters())
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size, device=param.device, dtype=param.dtype))
    finally:
        for module, training in modes.items():
            module.training = training
        for hook in hooks:
            hook.remove()
    return sizes


def set_gemm_convs(model: nn.Module, max_output: int, image_size: int = 32) -> list[str]:
    """Switch every GEMM-capable convolution whose output is at most `max_output` x `max_output` pixels to
    GemmConv2d, and every other one back to nn.Conv2d (0: none). Returns the names switched."""
    sizes = output_sizes(model, image_size) if max_output > 0 else {}
    chosen = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Conv2d):
            continue
        if name in sizes and max(sizes[name]) <= max_output and gemm_capable(module):
            module.__class__ = GemmConv2d
            chosen.append(name)
        elif type(module) is GemmConv2d:
            module.__class__ = nn.Conv2d
    return chosen
