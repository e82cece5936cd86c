"""MART (Wang et al.; METHOD 6): BCE(p(x'), y) + beta * mean_i KL(p(x_i) || p(x'_i)) * (1 - p_y(x_i)).

BCE = CE(f(x'), y) - log(1.0001 - max_{k != y} p_k(x')). x' = PGD-10 on CE from x + 0.001 * N(0, 1), model in
eval mode; the loss runs in train mode, the gradient flowing through p(x), p(x') and the weight 1 - p_y(x).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attacks import pgd
from .base import Method, Nets, StepOutput, correct, kl_rows, logits_pair

MARGIN = 1.0001  # MART's constant: keeps the log finite when the runner-up class takes all the mass


def boosted_ce(logits_a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CE(f(x'), y) - log(1.0001 - max_{k != y} p_k(x')), averaged over the batch."""
    probs = F.softmax(logits_a.float(), dim=1)  # (B, classes)
    runner_up = probs.scatter(1, y[:, None], -1.0).max(dim=1).values  # the largest wrong-class probability
    return F.cross_entropy(logits_a.float(), y) - torch.log(MARGIN - runner_up).mean()


def weighted_kl(logits_c: torch.Tensor, logits_a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """mean_i KL(p(x_i) || p(x'_i)) * (1 - p_y(x_i)): misclassified clean examples weigh more."""
    p_true = F.softmax(logits_c.float(), dim=1).gather(1, y[:, None]).squeeze(1)  # (B,)
    return (kl_rows(logits_c, logits_a) * (1 - p_true)).mean()


class MART(Method):
    name = "mart"

    def step(self, nets: Nets, x: torch.Tensor, y: torch.Tensor, autocast) -> StepOutput:
        x_adv = pgd(nets.attack, x, y, self.cfg.attack, bn="adv", train=False, autocast=autocast)
        with autocast():
            logits_c, logits_a = logits_pair(nets.train, x, x_adv, self.cfg.perf.dual_forward)
            cls = boosted_ce(logits_a, y)
            inv = self.cfg.method.beta * weighted_kl(logits_c, logits_a, y)
        return StepOutput(
            {"cls": cls, "inv": inv}, {"correct_adv": correct(logits_a, y), "correct_clean": correct(logits_c, y)}
        )
