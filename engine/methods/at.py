"""AT (Madry et al.; METHOD 6): CE(f(x'), y), x' = PGD-10 on CE from a uniform start.

The attack runs in train mode (batch statistics), as in Madry-style PyTorch code and the AR-AT code's plain-AT
branch; the one BN's running statistics then also see the attack's forwards.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attacks import pgd
from .base import Method, Nets, StepOutput, correct


class AT(Method):
    name = "at"

    def step(self, nets: Nets, x: torch.Tensor, y: torch.Tensor, autocast) -> StepOutput:
        x_adv = pgd(nets.attack, x, y, self.cfg.attack, bn="adv", train=True, autocast=autocast)
        with autocast():
            logits_a = nets.train(x_adv, bn="adv")
            cls = F.cross_entropy(logits_a.float(), y)
        return StepOutput({"cls": cls}, {"correct_adv": correct(logits_a, y)})
