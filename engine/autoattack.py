"""AutoAttack protocols around the original code (`pyautoattack`): `standard` and `legacy-10`, per-stage figures.

- `standard`: the leaderboard protocol (RobustBench): APGD-CE, APGD-T (9 target classes), FAB-T (9), Square (5,000
  queries), 100 iterations each for the gradient attacks, one restart each. pyautoattack's own "standard" version.
- `legacy-10`: the protocol of the code the AR-AT paper evaluated with (torchattacks' AutoAttack "standard"): the
  same four attacks with their defaults there: 10 iterations for APGD-CE and APGD-T, FAB-T at its own default of
  100 (torchattacks' FAB has steps=100 and its AutoAttack passes none: METHOD 7 and issue 10 say 10, which would
  under-attack the paper's protocol), Square at 5,000 queries with its step-size schedule rescaled to them
  (torchattacks' `resc_schedule=True`; pyautoattack's standard keeps the 10,000-query schedule), 9 target classes,
  one restart each. Fewer APGD iterations find fewer adversarial examples, so it reads robustness high.
  On CIFAR-100 too 9 target classes (torchattacks' default n_classes=10): whether the paper's code passed
  n_classes=100 there (99 targets for APGD-T and FAB-T) is not known.

Each call attacks one chunk of images with one seed (every sub-attack reseeds torch's RNG from it at each batch),
so the per-image outcome depends on the chunk, its seed and the batch size only.
"""

from __future__ import annotations

import logging
import re
import sys
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch import nn

from .attacks.pgd import frozen
from .config import EPS_8

STAGES = ("apgd-ce", "apgd-t", "fab-t", "square")


@dataclass(frozen=True)
class Protocol:
    version: str
    attacks: tuple[str, ...]
    iterations: int  # APGD-CE and APGD-T
    restarts: int
    target_classes: int  # APGD-T and FAB-T
    square_queries: int
    fab_iterations: int = 100
    square_rescaled_schedule: bool = False  # Square's size schedule scaled to its queries (torchattacks' default)
    eps: float = EPS_8
    norm: str = "Linf"

    def describe(self) -> dict:
        eps, checkpoints = "8/255" if self.eps == EPS_8 else self.eps, list(apgd_schedule(self.iterations))
        from .rundir import package_version

        code = f"pyautoattack {package_version('pyautoattack')}"  # an upgrade may change what the attack finds
        return asdict(self) | {"eps": eps, "apgd_checkpoints": checkpoints, "code": code}


PROTOCOLS = {
    "standard": Protocol("standard", STAGES, iterations=100, restarts=1, target_classes=9, square_queries=5000),
    "legacy-10": Protocol(
        "legacy-10",
        STAGES,
        iterations=10,
        restarts=1,
        target_classes=9,
        square_queries=5000,
        fab_iterations=100,
        square_rescaled_schedule=True,
    ),  # fmt: skip
}


def apgd_schedule(n_iter: int) -> tuple[int, int, int]:
    """APGD's step-size checkpoints for `n_iter` iterations: (first checkpoint, minimum interval, decrement)."""
    return max(int(0.22 * n_iter), 1), max(int(0.06 * n_iter), 1), max(int(0.03 * n_iter), 1)


def set_apgd_iterations(apgd, n_iter: int) -> None:
    """An APGD attack's iteration count and the step-size schedule derived from it. pyautoattack derives the
    schedule (first checkpoint at 22% of the iterations, the minimum interval 6%, its decrement 3%) once, when the
    attack is built; setting `n_iter` alone after that keeps the 100-iteration checkpoints (the first at 22), which
    10 iterations never reach: no step-size halving, no restart from the best point, a weaker attack. torchattacks
    derives it from the iterations of each run."""
    apgd.n_iter = apgd.n_iter_orig = n_iter
    apgd.n_iter_2, apgd.n_iter_min, apgd.size_decr = apgd_schedule(n_iter)


def adversary(model: nn.Module, protocol: Protocol, seed: int, device: torch.device):
    """pyautoattack's AutoAttack set to `protocol`, seeded with `seed` (never the clock)."""
    from pyautoattack import AutoAttack

    if protocol.version == "standard":
        aa = AutoAttack(model, norm=protocol.norm, eps=protocol.eps, version="standard", device=device, seed=seed)
    else:
        aa = AutoAttack(model, attacks=list(protocol.attacks), norm=protocol.norm, eps=protocol.eps, version="custom",
                        device=device, seed=seed)  # fmt: skip
        for apgd in (aa.apgd, aa.apgd_targeted):
            set_apgd_iterations(apgd, protocol.iterations)
        aa.fab.n_iter = protocol.fab_iterations
        aa.square.rescale_schedule = protocol.square_rescaled_schedule
        aa.apgd.n_restarts = aa.apgd_targeted.n_restarts = aa.fab.n_restarts = protocol.restarts
        aa.apgd_targeted.n_target_classes = aa.fab.n_target_classes = protocol.target_classes
        aa.square.n_queries = protocol.square_queries
    return aa


_WARNED: set[tuple[object, str]] = set()  # (network, warning) AutoAttack printed so far in this process


class _StageLog(logging.Handler):
    """Collects "initial accuracy: 45.00%" and "robust accuracy after APGD-CE: 42.00% (total time 12.3 s)" lines,
    as AutoAttack logs them before its first stage and after each (keyed "clean" and by stage; the time is since
    its first stage began, after the clean pass)."""

    PATTERN = re.compile(
        r"(?:initial accuracy|robust accuracy after ([A-Z-]+)): ([0-9.]+)%(?: \(total time ([0-9.]+) s\))?"
    )

    def __init__(self, on_stage=None, network: object = 0):
        super().__init__(logging.DEBUG)
        self.network = network  # whose warnings: each network evaluated in a process is told its own once
        self.after: dict[str, float] = {}
        self.total_s: dict[str, float] = {}
        self.on_stage = on_stage

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:  # AutoAttack's reliability checks (randomness, gradient masking, ...)
            message = record.getMessage()
            # once per network (each chunk runs its own AutoAttack) and per warning, whatever counts it quotes
            # ("there are tensor(3) points with zero gradient!": told again for each new count)
            said = (self.network, re.sub(r"tensor\(\d+[^)]*\)|\d+(?:\.\d+)?", "#", message))
            if said not in _WARNED:
                _WARNED.add(said)
                rank = f" (rank {dist.get_rank()})" if dist.is_available() and dist.is_initialized() else ""
                again = " (said once per network: later chunks' figures differ)" if said[1] != message else ""
                print(f"AutoAttack warning{rank}: {message}{again}", file=sys.stderr, flush=True)
            return
        match = self.PATTERN.search(record.getMessage())
        if match:
            stage = (match.group(1) or "clean").lower()
            self.after[stage] = float(match.group(2)) / 100
            if match.group(3) is not None:
                self.total_s[stage] = float(match.group(3))
            if self.on_stage is not None:
                self.on_stage(stage, self.after[stage])


BALL_SLACK = 1e-5  # fp32 rounding of x + delta, clamped to [x - eps, x + eps] and [0, 1], read back as x_adv - x


def check_inside_ball(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> None:
    """AutoAttack's adversarial examples lie in the Linf eps-ball around x and in [0, 1] (AutoAttack itself only
    logs their reach, at debug level): an image counted as broken by an example outside would read robustness low."""
    if not len(x):
        return
    reach, low, high = (x_adv - x).abs().amax().item(), x_adv.amin().item(), x_adv.amax().item()
    if not (reach <= eps + BALL_SLACK and low >= 0 and high <= 1):  # (NaN fails every comparison)
        raise RuntimeError(f"AutoAttack returned adversarial examples outside the eps-ball or [0, 1] (max |x_adv - x| "
                           f"{reach:.6f} for eps {eps:.6f}, values in [{low:.4f}, {high:.4f}]): its flags are not "
                           "used")  # fmt: skip


def attack_chunk(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    protocol: Protocol,
    seed: int,
    batch_size: int,
    on_stage=None,
    stage_seconds: dict[str, float] | None = None,
    network: str | int | None = None,
) -> tuple[torch.Tensor, dict[str, int]]:
    """(robust flag per image (bool, on the CPU), robust count after each stage, clean first). An image is robust
    when it is classified correctly and every attack of the protocol failed on it. `on_stage(stage, accuracy)` is
    called as AutoAttack reports the clean accuracy and each stage's robust accuracy (for a progress line).
    `stage_seconds`, if given, is filled with each stage's seconds as AutoAttack logs them (a stage skipped, nothing
    left to attack, 0; left empty where a stage's line carried no time)."""
    aa = adversary(model, protocol, seed, x.device)
    log = logging.getLogger("auto-attack")
    # whose warnings: the caller's name for the network (the evaluation's: its weights' fingerprint; the wrapper it
    # passes is built anew per evaluation, and a freed one's id comes back for the next network)
    key = id(model) if network is None else network
    handler, level, propagate = _StageLog(on_stage, key), log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    log.propagate = False  # AutoAttack's debug lines are read here, not printed (its warnings are)
    try:  # frozen weights: FAB's backward (a plain .backward()) would otherwise compute and keep weight gradients
        with frozen(model):
            x_adv, y_adv = aa.run_standard_evaluation(x, y, batch_size=batch_size)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate
    check_inside_ball(x_adv, x, protocol.eps)
    flags = (y_adv == y).cpu()
    if stage_seconds is not None and all(s in handler.total_s for s in handler.after if s != "clean"):
        before = 0.0
        for stage in protocol.attacks:
            total = handler.total_s.get(stage, before)
            stage_seconds[stage], before = round(max(total - before, 0.0), 3), total
    last = round(handler.after["clean"] * len(y))
    counts = {"clean": last}
    for stage in protocol.attacks:  # a stage skipped (nothing left to attack) leaves the count as it was
        last = round(handler.after[stage] * len(y)) if stage in handler.after else last
        counts[stage] = last
    if counts[protocol.attacks[-1]] != int(flags.sum()):
        raise RuntimeError(f"AutoAttack's log says {counts} robust after its stages, its labels {int(flags.sum())}")
    return flags, counts
