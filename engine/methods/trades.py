"""TRADES (Zhang et al.; METHOD 6): CE(f(x), y) + beta * KL(p(x) || p(x')), batchmean.

x' = PGD-10 maximizing KL(p(x) || p(x')) from x + 0.001 * N(0, 1) (`attack.start=gaussian` in the recipes), with
the model in eval mode and p(x) fixed; the loss then runs in train mode, the gradient flowing through both p(x)
and p(x'). The published code runs f(x), f(x') and f(x) again (its KL target) in train mode, so BN's running
statistics are updated clean, adv, clean; `method.published_bn_updates` (default) does the same with one extra
no-grad f(x) after the pair (the logits and gradients are the same either way).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attacks import pgd
from .base import Method, Nets, StepOutput, correct, eval_probs, kl_rows, logits_pair, running_stats_forward


def trades_attack(nets: Nets, x: torch.Tensor, y: torch.Tensor, cfg, autocast) -> torch.Tensor:
    """x' maximizing KL(p(x) || p(x')) on the model in eval mode (TRADES, also LBGAT)."""
    target = eval_probs(nets.attack, x, autocast)  # (B, classes)
    return pgd(nets.attack, x, y, cfg.attack, bn="adv", train=False, target_probs=target, autocast=autocast)


def trades_kl(logits_c: torch.Tensor, logits_a: torch.Tensor) -> torch.Tensor:
    """KL(p(x) || p(x')) summed over classes, averaged over the batch ("batchmean")."""
    return kl_rows(logits_c, logits_a).mean()


class TRADES(Method):
    name = "trades"

    def step(self, nets: Nets, x: torch.Tensor, y: torch.Tensor, autocast) -> StepOutput:
        x_adv = trades_attack(nets, x, y, self.cfg, autocast)
        with autocast():
            logits_c, logits_a = logits_pair(nets.train, x, x_adv, self.cfg.perf.dual_forward)  # BN: clean, adv
            if self.cfg.method.published_bn_updates:
                running_stats_forward(nets.attack, x)  # ..., clean: the published code's second f(x)
            cls = F.cross_entropy(logits_c.float(), y)
            inv = self.cfg.method.beta * trades_kl(logits_c, logits_a)
        return StepOutput(
            {"cls": cls, "inv": inv}, {"correct_adv": correct(logits_a, y), "correct_clean": correct(logits_c, y)}
        )
