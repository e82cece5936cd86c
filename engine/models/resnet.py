"""CIFAR ResNet-18 (METHOD 2): 3x3 stem, no max-pool, post-activation BasicBlocks [2, 2, 2, 2], Split-BN ready.

Module names follow the common CIFAR ResNet (`conv1`, `bn1`, `layerN.i.{conv1,bn1,conv2,bn2,shortcut.0,shortcut.1}`,
`linear`), so a plain checkpoint of that network (e.g. pyautoattack's `model_test.pt`) loads into `split_bn=False`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .splitbn import make_norm


def pooled(x: torch.Tensor) -> torch.Tensor:
    """z = global-average-pool(ReLU(x)): (B, C, H, W) -> (B, C)."""
    return F.relu(x).mean(dim=(2, 3))


class Shortcut(nn.Sequential):
    """1x1 conv + BN (indices 0 and 1, as in the common implementation) applied on a shape change."""

    def forward(self, x: torch.Tensor, bn: str) -> torch.Tensor:
        return self[1](self[0](x), bn)


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, split_bn: bool):
        super().__init__()
        norm = make_norm(split_bn)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm(planes)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = Shortcut(nn.Conv2d(in_planes, planes, 1, stride, bias=False), norm(planes))

    def forward(self, x: torch.Tensor, bn: str, taps: list[torch.Tensor] | None = None) -> torch.Tensor:
        out = self.bn1(self.conv1(x), bn, relu=True)
        if taps is not None:
            taps.append(out.mean(dim=(2, 3)))  # already ReLU(bn1)
        out = self.bn2(self.conv2(out), bn)
        if taps is not None:
            taps.append(pooled(out))  # bn2, before the residual add
        shortcut = x if self.shortcut is None else self.shortcut(x, bn)
        return F.relu(out + shortcut)


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 64, split_bn: bool = True):
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = make_norm(split_bn)(width)
        in_planes, layers = width, []
        for i, planes in enumerate(widths):
            blocks = [
                BasicBlock(in_planes, planes, 1 if i == 0 else 2, split_bn),
                BasicBlock(planes, planes, 1, split_bn),
            ]
            layers.append(nn.ModuleList(blocks))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(widths[-1], num_classes)
        self.feature_dims = [widths[-1]] * 4  # bn1 and bn2 of both layer4 blocks

    def forward(self, x: torch.Tensor, bn: str = "adv", features: bool = False):
        """Logits (B, classes); with `features`, also the tapped pooled features [(B, 8*width)] * 4."""
        taps: list[torch.Tensor] | None = [] if features else None
        out = self.bn1(self.conv1(x), bn, relu=True)  # (B, w, 32, 32)
        for block in (*self.layer1, *self.layer2, *self.layer3):
            out = block(out, bn)
        for block in self.layer4:
            out = block(out, bn, taps)  # (B, 8w, 4, 4)
        logits = self.linear(out.mean(dim=(2, 3)))
        return (logits, taps) if features else logits
