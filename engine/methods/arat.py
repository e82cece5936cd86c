"""AR-AT (METHOD 4): asymmetric invariance regularization with Split-BN; with switches, its ablations (METHOD 5).

Loss = w_adv * CE(f_adv(x'), y) + w_clean * CE(f_clean(x), y) + lambda/|S| * sum_l [1 - cos(h_l(z'_l), sg(z_l))]
with w_adv = clean-BN eval accuracy at the start of each epoch (auto-balance), w_clean = 1 - w_adv.
Ablations: `method.stop_grad=false` (gradient into both sides), `method.predictor=false` (no h_l),
`model.split_bn=false` (one BN set; each half still gets its own batch statistics).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import mode, pgd
from ..attacks.step import noise_like
from ..config import AttackConfig, TrainConfig
from ..distributed import mean_over_ranks
from ..models import SyncableBatchNorm1d
from .base import Method, Nets, StepOutput, correct, forward_pair


def distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity per image (fp32), averaged over the batch."""
    return (1 - F.cosine_similarity(a.float(), b.float(), dim=1)).mean()


class Predictor(nn.Module):
    """h: Linear(d, d/4, no bias) - BatchNorm1d(d/4) - ReLU - Linear(d/4, d); always in train mode."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, dim // 4, bias=False), SyncableBatchNorm1d(dim // 4), nn.ReLU(), nn.Linear(dim // 4, dim)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def attack_inputs(nets: Nets, x: torch.Tensor, y: torch.Tensor, cfg: AttackConfig, autocast):
    """(clean input, adversarial input). With the official-code quirk, the clean input is x + U(-eps, eps)
    (unclamped) and the attack starts there and projects around it, as the official in-place PGD does."""
    if cfg.official_quirk:
        x = x + cfg.eps * noise_like(x, "uniform")
        cfg = AttackConfig(cfg.eps, cfg.step_size, cfg.num_steps, start="none")
    return x, pgd(nets.attack, x, y, cfg, bn="adv", train=True, autocast=autocast)


class ARAT(Method):
    name = "arat"
    official_attack = True
    split_bn = None  # AR-AT and +split-BN use Split-BN; the V0 and +stop-grad ablations a single BN

    def __init__(self, cfg: TrainConfig, model: nn.Module):
        super().__init__(cfg, model)
        m = cfg.method
        dims = model.feature_dims
        self.predictors = nn.ModuleList([Predictor(d) for d in dims]) if m.predictor else None
        self.layer_weight = m.invariance_weight / len(dims)
        self.adv_weight = m.fixed_adv_weight

    def on_epoch_start(self, nets: Nets, head, autocast, epoch: int = 1) -> dict[str, float]:
        if self.cfg.method.auto_balance:
            self.adv_weight = mean_over_ranks(clean_branch_accuracy(nets.attack, head, autocast))
        return {"adv_weight": self.adv_weight}

    def invariance(self, feats_a: list[torch.Tensor], feats_c: list[torch.Tensor]) -> torch.Tensor:
        m = self.cfg.method
        total = feats_a[0].new_zeros((), dtype=torch.float32)
        for i, (za, zc) in enumerate(zip(feats_a, feats_c, strict=True)):
            pa = self.predictors[i](za) if self.predictors is not None else za
            if m.stop_grad:
                total = total + distance(pa, zc.detach())
            elif m.symmetric == "average":  # the poster's symmetric Dist: each side takes half the gradient
                total = total + (distance(pa, zc.detach()) + distance(pa.detach(), zc)) / 2
            else:
                total = total + distance(pa, zc)
        return self.layer_weight * total

    def step(self, nets: Nets, x: torch.Tensor, y: torch.Tensor, autocast) -> StepOutput:
        x_clean, x_adv = attack_inputs(nets, x, y, self.cfg.attack, autocast)
        with autocast():
            (logits_c, feats_c), (logits_a, feats_a) = forward_pair(
                nets.train, x_clean, x_adv, self.cfg.perf.dual_forward, features=True
            )
            w = self.adv_weight
            cls = w * F.cross_entropy(logits_a.float(), y) + (1 - w) * F.cross_entropy(logits_c.float(), y)
            inv = self.invariance(feats_a, feats_c)
        return StepOutput(
            {"cls": cls, "inv": inv}, {"correct_adv": correct(logits_a, y), "correct_clean": correct(logits_c, y)}
        )


@torch.no_grad()
def clean_branch_accuracy(model: nn.Module, batches, autocast) -> float:
    """Top-1 accuracy of the clean-BN branch in eval mode (one host sync per epoch)."""
    hits, count = 0, 0
    with mode(model, train=False), autocast():
        for x, y in batches:
            hits = hits + correct(model(x, bn="clean"), y)
            count += len(y)
    return float(hits) / max(count, 1)
