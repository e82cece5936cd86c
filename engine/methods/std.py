"""Standard (natural) training: CE(f(x), y) in train mode, no attack. The seed table's "Std. training" row and
ARREST's first stage."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Method, Nets, StepOutput, correct


def natural_step(model, x: torch.Tensor, y: torch.Tensor, autocast) -> StepOutput:
    with autocast():
        logits = model(x, bn="clean")
        cls = F.cross_entropy(logits.float(), y)
    return StepOutput({"cls": cls}, {"correct_clean": correct(logits, y)})


class Standard(Method):
    name = "std"

    def step(self, nets: Nets, x: torch.Tensor, y: torch.Tensor, autocast) -> StepOutput:
        return natural_step(nets.train, x, y, autocast)
