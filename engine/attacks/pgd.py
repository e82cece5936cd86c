"""PGD (L-inf) as a pure function: it never mutates its inputs, and parameters receive no gradient."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AttackConfig
from .step import pgd_step, random_start


@contextmanager
def mode(model: nn.Module, train: bool):
    """Run with the model in train or eval mode, restoring the caller's mode afterwards."""
    was_training = model.training
    model.train(train)
    try:
        yield
    finally:
        model.train(was_training)


@contextmanager
def frozen(model: nn.Module):
    """Parameters stop requiring gradients: the attack's backward then computes only the input gradient, also in a
    compiled graph (where autograd could not prune the weight gradients at run time)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def objective(logits: torch.Tensor, y: torch.Tensor, target_probs: torch.Tensor | None) -> torch.Tensor:
    """Sum-reduced CE to the labels, or (with target_probs) sum-reduced KL(target || p(x_adv)) as in TRADES."""
    logits = logits.float()
    if target_probs is None:
        return F.cross_entropy(logits, y, reduction="sum")
    return F.kl_div(F.log_softmax(logits, dim=1), target_probs, reduction="sum")


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: AttackConfig,
    *,
    bn: str,
    train: bool,
    target_probs: torch.Tensor | None = None,
    autocast=None,
) -> torch.Tensor:
    """x_adv in the eps-ball around x (and in [0, 1]), maximizing the objective through BN branch `bn`.

    `train` picks the model mode during the attack (train mode: batch statistics, running stats updated).
    `autocast` is a context factory for the forwards (mixed precision); the step itself runs in x's dtype.
    """
    x = x.detach()
    x_adv = random_start(x, cfg.eps, cfg.start)
    with mode(model, train), frozen(model):
        for _ in range(cfg.num_steps):
            x_adv.requires_grad_(True)
            with torch.enable_grad(), autocast() if autocast else nullcontext():
                loss = objective(model(x_adv, bn=bn), y, target_probs)
            (grad,) = torch.autograd.grad(loss, x_adv)
            with torch.no_grad():
                x_adv = pgd_step(x, x_adv.detach(), grad, cfg.eps, cfg.step_size)
    return x_adv.detach()
