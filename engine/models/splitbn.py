"""Split-BN: every BatchNorm2d becomes a {clean, adv} pair; the branch is an explicit argument of each forward.

Branches: "clean" and "adv" normalize the whole batch with that BN; "dual" takes a batch (2B, C, H, W) whose first
half is clean and second half adversarial and normalizes each half with its own BN and its own batch statistics.
"dual" is exactly two separate forwards (clean, then adv) run as one pass, so the convolutions see a batch of 2B.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .syncbn import SyncableBatchNorm2d

BRANCHES = ("clean", "adv", "dual")
# (x, clean_bn, adv_bn, relu) -> y; set by engine.perf when the fused dual-BN kernel is on.
DualBNKernel = Callable[[torch.Tensor, nn.BatchNorm2d, nn.BatchNorm2d, bool], torch.Tensor]


def dual_bn_reference(x: torch.Tensor, clean: nn.BatchNorm2d, adv: nn.BatchNorm2d, relu: bool) -> torch.Tensor:
    half = x.shape[0] // 2
    y = torch.cat([clean(x[:half]), adv(x[half:])])  # (2B, C, H, W), per-half batch statistics
    return F.relu(y) if relu else y


class _BranchNorm(nn.Module):
    dual_kernel: DualBNKernel | None = None

    def _dual(self, x: torch.Tensor, clean: nn.BatchNorm2d, adv: nn.BatchNorm2d, relu: bool) -> torch.Tensor:
        if x.shape[0] % 2:
            raise ValueError(f"bn='dual' needs a batch of 2B images (clean half, then adversarial half), got "
                             f"{x.shape[0]}")  # fmt: skip
        kernel = self.dual_kernel or dual_bn_reference
        return kernel(x, clean, adv, relu)


class SplitBatchNorm2d(_BranchNorm):
    def __init__(self, num_features: int):
        super().__init__()
        self.clean = SyncableBatchNorm2d(num_features)
        self.adv = SyncableBatchNorm2d(num_features)

    def forward(self, x: torch.Tensor, bn: str, relu: bool = False) -> torch.Tensor:
        if bn == "dual":
            return self._dual(x, self.clean, self.adv, relu)
        check_branch(bn)  # a typo must not evaluate the training-only clean branch
        y = self.adv(x) if bn == "adv" else self.clean(x)
        return F.relu(y) if relu else y


class BranchBatchNorm2d(_BranchNorm, SyncableBatchNorm2d):
    """A single BN that accepts the branch argument (single-BN methods and exported plain models).

    It is an nn.BatchNorm2d, so a plain network's state_dict (`bn1.weight`, ...) loads as is.
    """

    def forward(self, x: torch.Tensor, bn: str = "adv", relu: bool = False) -> torch.Tensor:
        if bn == "dual":  # same BN, but each half still gets its own batch statistics
            return self._dual(x, self, self, relu)
        check_branch(bn)  # a typo fails here as in a Split-BN network, not only once split_bn is on
        y = super().forward(x)
        return F.relu(y) if relu else y


def make_norm(split_bn: bool) -> Callable[[int], _BranchNorm]:
    return SplitBatchNorm2d if split_bn else BranchBatchNorm2d


def check_branch(bn: str) -> None:
    """A branch name other than clean, adv or dual is a ValueError (under torch.compile: checked while tracing)."""
    if bn not in BRANCHES:
        raise ValueError(f"bn={bn!r}: expected one of {BRANCHES}")


def split_bn_layers(model: nn.Module) -> list[_BranchNorm]:
    return [m for m in model.modules() if isinstance(m, _BranchNorm)]


def set_dual_kernel(model: nn.Module, kernel: DualBNKernel | None) -> None:
    for m in split_bn_layers(model):
        m.dual_kernel = kernel
