"""AT (Madry et al.; METHOD 6): CE(f(x'), y), x' = PGD-10 on CE from a uniform start.

The attack runs in train mode (batch statistics), as in Madry-style PyTorch code and the AR-AT code's plain-AT
branch; the one BN's running statistics then also see the attack's forwards. That branch attacks with the AR-AT
code's PGD, so `attack.official_quirk` applies here as in AR-AT (the attack starts from the noisy x and projects
around it; only x' enters AT's loss).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .arat import attack_inputs
from .base import Method, Nets, StepOutput, correct


class AT(Method):
    name = "at"
    official_attack = True

    def step(self, nets: Nets, x: torch.Tensor, y: torch.Tensor, autocast) -> StepOutput:
        _, x_adv = attack_inputs(nets, x, y, self.cfg.attack, autocast)  # PGD in train mode, adv BN
        with autocast():
            logits_a = nets.train(x_adv, bn="adv")
            cls = F.cross_entropy(logits_a.float(), y)
        return StepOutput({"cls": cls}, {"correct_adv": correct(logits_a, y)})
