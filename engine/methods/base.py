"""The interface every training objective implements; the training loop only talks to this."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import TrainConfig
from ..data import Batch


@dataclass
class Nets:
    """The network as the step needs it: `train` takes the gradient step (DDP-wrapped when distributed),
    `attack` runs attacks (never DDP: attacks need no gradient sync), `raw` is the plain module (state, export)."""

    train: nn.Module
    attack: nn.Module
    raw: nn.Module


@dataclass
class StepOutput:
    """Loss terms whose sum is the loss (`cls` and `inv` name the classification and invariance parts, for
    gradient-similarity analysis), and per-batch sums to accumulate on the device (correct counts, ...)."""

    terms: dict[str, torch.Tensor]
    sums: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def loss(self) -> torch.Tensor:
        return sum(self.terms.values())  # type: ignore[return-value]


class Method(nn.Module):
    """A training objective: its attack, its loss, and any extra trainable modules (held as submodules, so they
    are saved in checkpoints and optimized with the network)."""

    name = "base"
    split_bn = False  # whether the network is built with Split-BN

    def __init__(self, cfg: TrainConfig, model: nn.Module):
        super().__init__()
        self.cfg = cfg

    def on_epoch_start(self, nets: Nets, head: list[Batch], autocast) -> dict[str, float]:
        """Called before each epoch with its first batches (~cfg.method.balance_images images, augmented,
        not yet trained on). Returns values to log."""
        return {}

    def step(self, nets: Nets, x: torch.Tensor, y: torch.Tensor, autocast) -> StepOutput:
        raise NotImplementedError


def correct(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(dim=1) == y).sum()
