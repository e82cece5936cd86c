"""WRN-34-10, TRADES variant (METHOD 2): pre-activation blocks, widths 16/160/320/640, Split-BN ready.

Module names follow the TRADES code (`block1.layer.0.bn1`, `convShortcut`, `fc`), so its plain checkpoints load
(`load_plain` drops the keys of TRADES's `sub_block1`, a group its forward never calls).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .splitbn import make_norm


class WideBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, split_bn: bool):
        super().__init__()
        norm = make_norm(split_bn)
        self.bn1 = norm(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = norm(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor, bn: str, taps: list[torch.Tensor] | None = None) -> torch.Tensor:
        act = self.bn1(x, bn, relu=True)  # relu1
        out = self.bn2(self.conv1(act), bn, relu=True)  # relu2
        if taps is not None:
            taps += [act.mean(dim=(2, 3)), out.mean(dim=(2, 3))]
        out = self.conv2(out)
        # TRADES: without equal widths, the shortcut takes the activated input
        return (x if self.equal_in_out else self.convShortcut(act)) + out


class Group(nn.Module):
    def __init__(self, num_blocks: int, in_planes: int, out_planes: int, stride: int, split_bn: bool):
        super().__init__()
        blocks = [
            WideBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, split_bn)
            for i in range(num_blocks)
        ]
        self.layer = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, bn: str, taps: list[torch.Tensor] | None = None) -> torch.Tensor:
        for block in self.layer:
            x = block(x, bn, taps)
        return x


class WideResNet(nn.Module):
    def __init__(self, num_classes: int = 10, depth: int = 34, widen: int = 10, split_bn: bool = True):
        super().__init__()
        assert (depth - 4) % 6 == 0, "WRN depth must be 6n + 4"
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.block1 = Group(n, widths[0], widths[1], 1, split_bn)
        self.block2 = Group(n, widths[1], widths[2], 2, split_bn)
        self.block3 = Group(n, widths[2], widths[3], 2, split_bn)
        self.bn1 = make_norm(split_bn)(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        self.feature_dims = [widths[2]] + [widths[3]] * (2 * n)  # relu1/relu2 of the last group + final pool
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.bias.data.zero_()

    def forward(self, x: torch.Tensor, bn: str = "adv", features: bool = False):
        """Logits (B, classes); with `features`, also the 11 tapped pooled features (320-d, then 640-d)."""
        taps: list[torch.Tensor] | None = [] if features else None
        out = self.block2(self.block1(self.conv1(x), bn), bn)
        out = self.block3(out, bn, taps)  # (B, 640, 8, 8)
        pooled = self.bn1(out, bn, relu=True).mean(dim=(2, 3))  # (B, 640)
        if taps is not None:
            taps.append(pooled)
        logits = self.fc(pooled)
        return (logits, taps) if features else logits
