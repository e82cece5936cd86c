"""ARREST (Suzuki et al.; METHOD 6): adversarial fine-tuning of a standard-trained network with a representation
constraint to a frozen copy of it, and noisy replay. Hyper-parameters are reconstructed (unverified): all are
config fields (docs/methods.md says what was chosen and why).

Two stages in one run: `method.pretrain_epochs` epochs of standard training (the `optim.*` schedule), then
fine-tuning for the remaining epochs (`method.finetune_lr`, decayed after `method.finetune_milestones`); or, with
`method.init` (`arat train --init PATH`), fine-tuning from an existing checkpoint for the whole run.

Fine-tuning loss: CE(f(x~), y) + lambda * mean_i [1 - cos(h_T(x_i), h(x~_i))], h = penultimate feature (the
classifier's input), T = the teacher, frozen at the start of fine-tuning. x~ = PGD-10 on CE (eval mode), except
while noisy replay fires: x~ = x + U(-eps, eps) when the batch's mean clean-feature cosine cos(h(x), h_T(x)) is
below `method.replay_cos` (cos 30 deg) and the fine-tuning epoch is within the first `method.replay_until` of
fine-tuning. The per-batch decision is a device-side select (the attack is always computed), so there is no host
sync.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import mode, pgd, random_start
from ..config import ConfigError, TrainConfig, in_replay_window, lr_at
from ..distributed import average_bn_statistics, group_info, mean_over_ranks_of
from ..models import build_model, export_state_dict, load_plain, read_weights, run_network_file
from .base import Method, Nets, StepOutput, correct, freeze
from .std import natural_step


class FeatureTap:
    """Keeps the input of a network's classifier (the penultimate feature, (B, d)) from its latest forward.

    A hook registered once, before any compilation, so compiled graphs see it from the start (dynamo does not guard
    on hooks: a graph this process built earlier for the same code on an unhooked network would be reused without
    it, and the tap's assertion below says so)."""

    def __init__(self, model: nn.Module):
        head = model.linear if hasattr(model, "linear") else model.fc
        self.last: torch.Tensor | None = None
        self.handle = head.register_forward_pre_hook(self._keep)

    def _keep(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self.last = args[0]

    def __call__(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, penultimate feature) of model(x) through the adv (= only) BN."""
        logits = model(x, bn="adv")
        feature, self.last = self.last, None  # hold no reference past the call
        assert feature is not None, "the classifier did not run"
        return logits, feature


def read_init_state(path: str) -> dict[str, torch.Tensor]:
    """A plain state_dict from a plain checkpoint, an engine checkpoint, or a run directory (its final.pt)."""
    state, _ = read_weights(run_network_file(path))
    return export_state_dict(state)


def replay_switch(h_student: torch.Tensor, h_teacher: torch.Tensor, threshold: float) -> torch.Tensor:
    """Device bool: the batch's mean clean-feature cosine to the teacher is below `threshold`. Under DDP the batch
    is every rank's (ranks' equal shares: the mean of their means), so all ranks replay or attack together, as one
    process would (one all-reduce on the device: no host sync)."""
    cos = F.cosine_similarity(h_student.float(), h_teacher.float(), dim=1).mean()
    (cos,) = mean_over_ranks_of([cos], group_info())
    return cos < threshold


def init_overrides(cfg: TrainConfig, path: str) -> list[str]:
    """`arat train --init PATH`: fine-tune PATH for the recipe's fine-tuning length, skipping standard training."""
    if cfg.method.name != "arrest":
        raise ConfigError(f"--init fine-tunes a checkpoint with ARREST; recipe {cfg.recipe} trains {cfg.method.name}")
    epochs = cfg.epochs - cfg.method.pretrain_epochs
    resolved = Path(path).expanduser().resolve()  # stored absolute: a resume from another directory finds it
    return [f"method.init={resolved}", "method.pretrain_epochs=0", f"train.epochs={epochs}"]


class ARREST(Method):
    name = "arrest"
    second_networks = ("teacher",)

    def __init__(self, cfg: TrainConfig, model: nn.Module):
        super().__init__(cfg, model)
        m = cfg.method
        self.pretrain_epochs = m.pretrain_epochs
        if cfg.epochs - m.pretrain_epochs < 1:  # no fine-tuning epoch
            raise ConfigError(
                f"ARREST fine-tunes after method.pretrain_epochs={m.pretrain_epochs}: train.epochs must exceed it"
            )
        self.teacher = freeze(build_model(cfg.model, cfg.data.num_classes, split_bn=False))
        self.register_buffer("teacher_ready", torch.zeros((), dtype=torch.bool))
        self.student_tap, self.teacher_tap = FeatureTap(model), FeatureTap(self.teacher)
        self.epoch = 1
        if m.init:  # loaded again on resume, then replaced by the checkpoint's weights
            load_plain(model, read_init_state(m.init), m.init)
            self.snapshot_teacher(model)

    def train(self, mode: bool = True) -> ARREST:
        super().train(mode)
        self.teacher.eval()  # frozen: its BN keeps the pretrained running statistics
        return self

    @torch.no_grad()
    def snapshot_teacher(self, model: nn.Module) -> None:
        self.teacher.load_state_dict(model.state_dict())
        self.teacher_ready.fill_(True)

    def lr_at(self, epoch: int) -> float:
        return lr_at(self.cfg, epoch)  # (a resume compares it under the checkpoint's config: engine.config)

    def epoch_cost(self, epoch: int) -> float:
        """Forward units F per image (a backward ~2F): standard training 3F; fine-tuning 2F per attack step, the
        teacher's forward, the student's clean forward (replay window) and its forward and backward."""
        return 3.0 if epoch <= self.pretrain_epochs else 2.0 * self.cfg.attack.num_steps + 5.0

    def fresh_optimizer_at(self, epoch: int) -> bool:
        """Fine-tuning starts with no momentum from the standard-training stage, as a run from --init does."""
        return not self.cfg.method.init and epoch == self.pretrain_epochs + 1

    def on_epoch_start(self, nets: Nets, head, autocast, epoch: int = 1) -> dict[str, float]:
        self.epoch = epoch
        if epoch > self.pretrain_epochs and not bool(self.teacher_ready):  # one host sync per epoch
            self.snapshot_teacher(nets.raw)
            # under DDP each rank's BN statistics are its own (the standard stage's): one teacher for every rank,
            # with their average, as the final network takes (a run from --init loads the same file everywhere)
            average_bn_statistics(self.teacher, group_info(), sum_counts=False)
        return {"finetune_epoch": max(epoch - self.pretrain_epochs, 0)}

    def replay_window(self) -> bool:
        """Whether the current epoch lies in the part of fine-tuning where noisy replay may fire."""
        return in_replay_window(self.cfg, self.epoch)

    def step(self, nets: Nets, x: torch.Tensor, y: torch.Tensor, autocast) -> StepOutput:
        if self.epoch <= self.pretrain_epochs:
            return natural_step(nets.train, x, y, autocast)
        m, eps = self.cfg.method, self.cfg.attack.eps
        with torch.no_grad(), autocast():
            _, h_teacher = self.teacher_tap(self.runner("teacher"), x)  # (B, d)
        x_in = pgd(nets.attack, x, y, self.cfg.attack, bn="adv", train=False, autocast=autocast)
        self.student_tap.last = None  # the attack's forwards fired the tap too (captured: a tensor in the graph's pool)
        sums: dict[str, torch.Tensor] = {}
        if self.replay_window():
            with torch.no_grad(), mode(nets.attack, train=False), autocast():
                _, h_clean = self.student_tap(nets.attack, x)
            replay = replay_switch(h_clean, h_teacher, m.replay_cos)  # device bool: no host branch
            x_in = torch.where(replay, random_start(x, eps, "uniform"), x_in)
            sums["replay"] = replay.float()
        with autocast():
            logits, h = self.student_tap(nets.train, x_in)
            cls = F.cross_entropy(logits.float(), y)
            inv = m.invariance_weight * (1 - F.cosine_similarity(h_teacher.float(), h.float(), dim=1)).mean()
        sums.setdefault("replay", cls.new_zeros(()))
        return StepOutput({"cls": cls, "inv": inv}, {"correct_adv": correct(logits, y), **sums})
