"""SWA (METHOD 4): equal-weight running mean of the parameters, then adv-BN re-estimation on attacked data."""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from torch import nn

from .attacks import graphs, pgd
from .config import AttackConfig, ConfigError, SWAConfig
from .data import Loader
from .errors import UserError
from .progress import progress_bar


class SWA:
    def __init__(self, model: nn.Module, cfg: SWAConfig):
        self.cfg = cfg
        self.count = 0
        self.started_on_resume = False  # turned on in config.json for a resume of a run that trained without it
        self.kept: dict | None = None  # with SWA off: the checkpoint's average, carried over to the next checkpoint
        # an fp32 copy of the parameters only where SWA is on (WRN-34-10: ~185 MB on the device and in each checkpoint)
        params = model.named_parameters() if cfg.enabled else ()
        self.average = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params}

    def updates(self, steps_per_epoch: int, epochs: int, done: int = 0) -> int:
        """How many averaging updates a run of `epochs` epochs of `steps_per_epoch` steps makes after its first
        `done` epochs (0 with SWA off)."""
        if not self.cfg.enabled or self.cfg.start_epoch > epochs:
            return 0
        before = max(max(self.cfg.start_epoch, 1) - 1, done) * steps_per_epoch  # steps taken before averaging starts
        return max(epochs * steps_per_epoch // self.cfg.every - before // self.cfg.every, 0)

    def active(self, epoch: int) -> bool:
        return self.cfg.enabled and epoch >= self.cfg.start_epoch

    @torch.no_grad()
    def maybe_update(self, model: nn.Module, epoch: int, step: int) -> None:
        """Call after optimizer step number `step` (1-based, counted over the whole run)."""
        if not self.active(epoch) or step % self.cfg.every:
            return
        self.count += 1
        for name, p in model.named_parameters():
            self.average[name].add_(p.float() - self.average[name], alpha=1 / self.count)

    def state_dict(self) -> dict:
        if not self.cfg.enabled and self.kept is not None:  # off for now: the checkpoint's average carried over
            return self.kept
        # the cadence the average was taken at: a run that turns SWA off and on again must keep it (below)
        return {"count": self.count, "average": self.average, "start_epoch": self.cfg.start_epoch,
                "every": self.cfg.every}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        if not self.cfg.enabled:  # nothing to average into: the checkpoint's average, if any, is carried over as it
            # is (SWA turned off in config.json and on again later: averaging goes on from it, where the next
            # checkpoint had dropped it and started over, saying SWA had been off for every epoch)
            if state.get("average") and state.get("count"):
                self.kept = state
            return
        if not state["average"]:  # the checkpoint's run had SWA off: averaging starts now, from the fresh zeros
            self.started_on_resume = True
            return
        cadence = lambda start_epoch, every: (max(start_epoch, 1), every)  # noqa: E731 (start_epoch 0 is epoch 1)
        taken = (state["start_epoch"], state["every"]) if "every" in state else None  # (older checkpoints: none)
        # a resume with SWA on all along is refused a change earlier (config.resume_change)
        if state["count"] and taken is not None and cadence(*taken) != cadence(self.cfg.start_epoch, self.cfg.every):
            raise ConfigError(
                f"the checkpoint's SWA average of {state['count']} snapshots was taken with swa.start_epoch="
                f"{taken[0]}, swa.every={taken[1]} (before SWA was turned off in config.json): set them back to "
                "average on from it, or keep swa.enabled=false"
            )
        self.count = state["count"]
        self.average = {k: v.to(self.average[k].device) for k, v in state["average"].items()}

    def averaged_model(
        self, model: nn.Module, loader: Loader, attack: AttackConfig, autocast, show: bool = True
    ) -> nn.Module:
        """A copy of `model` holding the averaged parameters and freshly estimated adv-BN statistics."""
        if self.count == 0:  # build_run refuses such a run before training; a checkpoint edited since could hold one
            raise UserError(
                "SWA collected no average (no step from swa.start_epoch on was a multiple of swa.every): lower "
                "swa.start_epoch or swa.every in the run's config.json, or set swa.enabled=false"
            )
        averaged = copy.deepcopy(model)
        with torch.no_grad():
            for name, p in averaged.named_parameters():
                p.copy_(self.average[name])
        reestimate_adv_bn(averaged, loader, attack, autocast, show)
        return averaged


def _batch_norms(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextmanager
def frozen_bn_stats(model: nn.Module):
    """Forwards inside leave every BN's running statistics as they were (attack forwards must not count)."""
    saved = [
        (m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in _batch_norms(model)
    ]
    try:
        yield
    finally:
        for m, mean, var, tracked in saved:
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(tracked)


def reestimate_adv_bn(model: nn.Module, loader: Loader, attack: AttackConfig, autocast, show: bool = True) -> None:
    """Reset all BN statistics; one pass over `loader`: attack each batch (PGD on the averaged model, adv BNs,
    train mode), then accumulate adv-BN statistics on the attacked batch as a cumulative moving average."""
    norms = _batch_norms(model)
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
    model.train()
    bar = progress_bar(loader, desc="swa: adv-BN re-estimation", leave=False, dynamic_ncols=True, disable=not show)
    for k, (x, y) in enumerate(bar, start=1):
        # The cumulative moving average, as BN's momentum None computes it, without its host read: None makes every
        # train-mode forward read num_batches_tracked back (float(), ~200 syncs per batch in the attack alone). The
        # attack's updates are undone (frozen_bn_stats): any momentum serves there, a fixed one. Then the k-th
        # batch's update with factor 1/k, the very float momentum None derives from the count (k after its add).
        set_momentum(norms, 0.0)
        with frozen_bn_stats(model), graphs.using(None):  # eager: one pass of a model made for it
            x_adv = pgd(model, x, y, attack, bn="adv", train=True, autocast=autocast)
        set_momentum(norms, 1.0 / k)
        with torch.no_grad(), autocast():
            model(x_adv, bn="adv")
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.eval()


def set_momentum(norms: list[nn.modules.batchnorm._BatchNorm], momentum: float) -> None:
    for m in norms:
        m.momentum = momentum
