"""PGD (L-inf) as a pure function: it never mutates its inputs, and parameters receive no gradient."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AttackConfig
from . import graphs
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


def objective(
    logits: torch.Tensor, y: torch.Tensor, target_probs: torch.Tensor | None, per_image: bool = False
) -> torch.Tensor:
    """Sum-reduced CE to the labels, or (with target_probs) sum-reduced KL(target || p(x_adv)) as in TRADES; with
    `per_image` each image's, (B,)."""
    logits = logits.float()
    reduction = "none" if per_image else "sum"
    if target_probs is None:
        return F.cross_entropy(logits, y, reduction=reduction)
    kl = F.kl_div(F.log_softmax(logits, dim=1), target_probs, reduction=reduction)
    return kl.sum(dim=1) if per_image else kl


def fp16_gradient_scale(
    logits: torch.Tensor, y: torch.Tensor, target_probs: torch.Tensor | None, per_image: bool = False
) -> torch.Tensor:
    """A power of two that lifts the largest logit gradient of `objective` to [2^7, 2^8], so that an fp16 backward
    neither underflows (a confident network's gradients fall below fp16's 6e-8; sign(0) = 0 silently weakens the
    attack) nor overflows (the logit gradient of CE or KL is at most 1 per entry, as at initialization). One scalar
    for the whole batch, or with `per_image` one per image, (B,): a power of two changes no sign. No sync."""
    probs = F.softmax(logits.detach().float(), dim=1)  # (B, classes)
    target = F.one_hot(y, probs.shape[1]).to(probs.dtype) if target_probs is None else target_probs
    gap = (probs - target).abs()
    largest = (gap.amax(dim=1) if per_image else gap.amax()).clamp_min(2.0**-100)
    return torch.exp2(8 - torch.ceil(torch.log2(largest)))


def fp16_scaled_objective(logits: torch.Tensor, y: torch.Tensor, target_probs, coupled: bool) -> torch.Tensor:
    """`objective` for an fp16 backward. Images a train-mode batch norm couples (`coupled`: each image's gradient
    mixes every image's loss) share one scale, which leaves that mix as fp32 weighs it; a confident image beside a
    badly classified one may still underflow there. Otherwise (eval mode) each image gets its own: one badly
    classified image set the batch's scale to 2^8, under which a confident image's gradient (~1e-9) underflowed."""
    scale = fp16_gradient_scale(logits, y, target_probs, per_image=not coupled)
    return (objective(logits, y, target_probs, per_image=not coupled) * scale).sum()


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
    With CUDA graphs installed (engine.attacks.graphs), the whole attack is captured once and replayed.
    """
    x = x.detach()
    captured = graphs.active()
    if captured is not None and cfg.num_steps > 0 and captured.applies(x):
        return captured.run(eager_pgd, model, x, y, cfg, bn=bn, train=train, target_probs=target_probs,
                            autocast=autocast)  # fmt: skip
    return eager_pgd(model, x, y, cfg, bn=bn, train=train, target_probs=target_probs, autocast=autocast)


def eager_pgd(model, x, y, cfg: AttackConfig, *, bn: str, train: bool, target_probs=None, autocast=None):
    """The attack itself (what a CUDA graph captures)."""
    x_adv = random_start(x, cfg.eps, cfg.start)
    with mode(model, train), frozen(model) if is_compiled(model) else nullcontext(), autocast_once(autocast):
        for _ in range(cfg.num_steps):
            grad = input_gradient(model, x_adv, y, bn, target_probs, None)
            with torch.no_grad():
                x_adv = pgd_step(x, x_adv.detach(), grad, cfg.eps, cfg.step_size)
    return x_adv.detach()


def is_compiled(model: nn.Module) -> bool:
    """A torch.compile'd module: its graphs are traced with the weights frozen (see `frozen`)."""
    return isinstance(model, torch._dynamo.eval_frame.OptimizedModule)


def autocast_once(autocast):
    """The attack's autocast context, entered once around all its steps. Eagerly, autocast then casts each weight
    to the low precision once per attack, not once per forward: its cast cache keeps the casts of leaf tensors that
    require grad, which is why eager attacks leave the weights requiring grad (autograd.grad(loss, x_adv) still
    computes no weight gradient: the engine prunes what the requested input does not need). A compiled attack
    freezes them instead (a compiled backward computes every gradient its graph was traced with)."""
    return autocast() if autocast else nullcontext()


def input_gradient(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, bn: str, target_probs, autocast):
    """d objective / d x_adv (its signs are what PGD uses); under fp16 autocast, of the loss scaled by powers of two
    against underflow (`fp16_scaled_objective`)."""
    x_adv = x_adv.detach().requires_grad_(True)
    with torch.enable_grad(), autocast() if autocast else nullcontext():
        logits = model(x_adv, bn=bn)
        if logits.dtype == torch.float16:
            loss = fp16_scaled_objective(logits, y, target_probs, coupled=model.training)
        else:
            loss = objective(logits, y, target_probs)
    (grad,) = torch.autograd.grad(loss, x_adv)
    return grad
