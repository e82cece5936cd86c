"""LBGAT (Cui et al.; METHOD 6): MSE(f(x'), g(x)) + CE(g(x), y) (+ beta * KL(p_f(x) || p_f(x')), beta = 0 in the
paper's runs), where g is a naturally trained ResNet-18 trained jointly, in the same optimizer.

x' = TRADES-KL attack on f in eval mode. g is a plain (single-BN) ResNet-18 held as a submodule (checkpointed,
optimized); its width follows the student's when the student is a ResNet-18, else 64 (the real network). The MSE
reaches both networks: f is pulled to g's logits and g's boundary is pulled toward f's (the "learnable boundary").
The published code always runs f(x') then f(x) in train mode (f(x) feeds the KL term, weighted 0 at beta 0), so f's
BN running statistics are updated adv, clean; with `method.published_bn_updates` (default) so are the engine's (at
beta 0 the f(x) forward is a no-grad one: it adds nothing to the gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, TrainConfig
from ..models import build_model
from .base import Method, Nets, StepOutput, correct, logits_pair, running_stats_forward
from .trades import trades_attack, trades_kl


def clean_model_config(cfg: TrainConfig) -> ModelConfig:
    width = cfg.model.width if cfg.model.arch == "resnet18" else 64
    return ModelConfig(arch="resnet18", width=width, split_bn=False)


class LBGAT(Method):
    name = "lbgat"
    second_networks = ("clean_model",)

    def __init__(self, cfg: TrainConfig, model: nn.Module):
        super().__init__(cfg, model)
        self.clean_model = build_model(clean_model_config(cfg), cfg.data.num_classes)  # g

    def backbones(self) -> list[nn.Module]:
        return [self.clean_model]

    def step(self, nets: Nets, x: torch.Tensor, y: torch.Tensor, autocast) -> StepOutput:
        x_adv = trades_attack(nets, x, y, self.cfg, autocast)
        beta, published = self.cfg.method.beta, self.cfg.method.published_bn_updates
        dual = self.cfg.perf.dual_forward
        with autocast():
            if beta > 0 and published:  # one BN, each half its own statistics: the order only moves running stats
                logits_a, logits_c = logits_pair(nets.train, x_adv, x, dual)  # BN: adv, clean
            elif beta > 0:
                logits_c, logits_a = logits_pair(nets.train, x, x_adv, dual)
            else:
                logits_a = nets.train(x_adv, bn="adv")
                if published:
                    running_stats_forward(nets.attack, x)  # the published code's f(x), weighted 0 at beta 0
            logits_g = self.runner("clean_model")(x)
            cls = F.cross_entropy(logits_g.float(), y)
            inv = F.mse_loss(logits_a.float(), logits_g.float())
            if beta > 0:
                inv = inv + beta * trades_kl(logits_c, logits_a)
        sums = {"correct_adv": correct(logits_a, y), "correct_clean_model": correct(logits_g, y)}
        return StepOutput({"cls": cls, "inv": inv}, sums)
