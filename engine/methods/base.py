"""The interface every training objective implements; the training loop only talks to this."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import mode
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
    are saved in checkpoints and optimized with the network; frozen ones hold parameters with requires_grad
    False, which the optimizer leaves out)."""

    name = "base"
    split_bn: bool | None = False  # True: needs Split-BN; False: single BN only; None: either (model.split_bn)
    second_networks: tuple[str, ...] = ()  # submodules run like the model (LBGAT's clean model, ARREST's teacher)
    official_attack: bool = False  # its official code is the AR-AT code's (attack.official_quirk means something)

    def __init__(self, cfg: TrainConfig, model: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.runners: dict[str, nn.Module] = {}  # a plain dict: the runners are not submodules (no state_dict keys)

    def follow(self, prepare) -> None:
        """Run the second networks as the model runs: `prepare(net)` applies the perf switches (channels-last,
        compile) and returns what to call."""
        self.runners = {name: prepare(getattr(self, name)) for name in self.second_networks}

    def runner(self, name: str) -> nn.Module:
        """What to call for second network `name` (itself until `follow`)."""
        return self.runners[name] if name in self.runners else getattr(self, name)

    def on_epoch_start(self, nets: Nets, head: list[Batch], autocast, epoch: int = 1) -> dict[str, float]:
        """Called before each (1-based) epoch with its first batches (~cfg.method.balance_images images over all ranks,
        augmented, not yet trained on). Returns values to log."""
        return {}

    def lr_at(self, epoch: int) -> float:
        """Learning rate of 1-based `epoch` (methods with stages override it)."""
        return self.cfg.optim.lr_at(epoch)

    def fresh_optimizer_at(self, epoch: int) -> bool:
        """Whether 1-based `epoch` starts a new stage whose optimizer starts without momentum (methods with
        stages override it)."""
        return False

    def epoch_cost(self, epoch: int) -> float:
        """The relative cost of 1-based `epoch`'s steps (for the time-left estimate; methods whose stages differ in
        cost override it)."""
        return 1.0

    def backbones(self) -> list[nn.Module]:
        """Trained networks besides the model whose Conv2d/Linear weights the gradient-similarity analysis
        counts as backbone (LBGAT's clean model)."""
        return []

    def step(self, nets: Nets, x: torch.Tensor, y: torch.Tensor, autocast) -> StepOutput:
        raise NotImplementedError


def correct(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(dim=1) == y).sum()


def forward_pair(model: nn.Module, x_clean: torch.Tensor, x_adv: torch.Tensor, dual: bool, features: bool = False):
    """(output of x_clean, output of x_adv), each half normalized with its own batch statistics: one pass over the
    concatenated batch (bn="dual"; a single-BN model uses its one BN for both halves), or two passes. An output is
    the logits, or with `features` (logits, tapped features)."""
    if not dual:
        return model(x_clean, bn="clean", features=features), model(x_adv, bn="adv", features=features)
    both = torch.cat([x_clean, x_adv])  # (2B, 3, 32, 32): clean half first
    if x_clean.is_contiguous(memory_format=torch.channels_last):
        both = both.contiguous(memory_format=torch.channels_last)
    out = model(both, bn="dual", features=features)
    halves = (slice(None, len(x_clean)), slice(len(x_clean), None))
    if not features:
        return tuple(out[h] for h in halves)
    logits, feats = out
    return tuple((logits[h], [f[h] for f in feats]) for h in halves)


def logits_pair(model: nn.Module, x_clean: torch.Tensor, x_adv: torch.Tensor, dual: bool):
    """(logits of x_clean, logits of x_adv): `forward_pair` without features."""
    return forward_pair(model, x_clean, x_adv, dual)


@torch.no_grad()
def running_stats_forward(model: nn.Module, x: torch.Tensor) -> None:
    """A train-mode forward whose only effect is on the BN running statistics (no gradient, output dropped): the
    forwards a published code runs whose outputs add nothing to the gradient (TRADES's second f(x), LBGAT's f(x) at
    beta 0) still move its running statistics, which evaluation then uses."""
    with mode(model, train=True):
        model(x, bn="adv")


@torch.no_grad()
def eval_probs(model: nn.Module, x: torch.Tensor, autocast) -> torch.Tensor:
    """softmax(f(x)) in eval mode, fp32 (B, classes): the fixed target of a TRADES-KL attack."""
    with mode(model, train=False), autocast():
        return F.softmax(model(x, bn="adv").float(), dim=1)


def kl_rows(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row (B,), p and q given by logits (fp32 math)."""
    log_p, log_q = F.log_softmax(logits_p.float(), dim=1), F.log_softmax(logits_q.float(), dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def freeze(module: nn.Module) -> nn.Module:
    """`module`'s parameters stop requiring gradients (kept in state_dict, left out of the optimizer)."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module
