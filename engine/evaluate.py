"""Evaluation (METHOD 7): clean, PGD-20 and AutoAttack (original code, `pyautoattack`), adv BNs, eval mode."""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .attacks import mode, pgd
from .config import EPS_8, STEP_2, AttackConfig, EvalConfig
from .data import ArraySplit

PGD20 = AttackConfig(eps=EPS_8, step_size=STEP_2, num_steps=20, start="uniform")


class AdvBranch(nn.Module):
    """The deployed classifier: adv-BN branch, fp32 logits (what AutoAttack and PGD-20 see)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, bn="adv").float()


def test_tensors(split: ArraySplit, num_examples: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `num_examples` test images in official order, (N, 3, 32, 32) float in [0, 1]."""
    n = min(num_examples, len(split))
    x = torch.from_numpy(np.ascontiguousarray(split.images[:n])).to(device).permute(0, 3, 1, 2).float() / 255
    return x.contiguous(), torch.from_numpy(split.labels[:n]).to(device)


def _batches(n: int, batch_size: int, desc: str):
    return tqdm(range(0, n, batch_size), desc=desc, leave=False, dynamic_ncols=True)


@torch.no_grad()
def clean_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    hits = sum(
        int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
        for i in _batches(len(y), batch_size, "eval: clean")
    )
    return hits / len(y)


def pgd_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> float:
    torch.manual_seed(seed)
    hits = 0
    for i in _batches(len(y), batch_size, "eval: pgd20"):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        x_adv = pgd(model.model, xb, yb, PGD20, bn="adv", train=False)
        with torch.no_grad():
            hits += int((model(x_adv).argmax(1) == yb).sum())
    return hits / len(y)


def autoattack_accuracy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, version: str, seed: int
) -> float:
    """AutoAttack on chunks of `batch_size` images (per-example attacks, so chunking changes nothing but the
    progress bar); an image counts as robust when every attack of the version failed on it."""
    from pyautoattack import AutoAttack

    logging.getLogger("auto-attack").setLevel(logging.ERROR)
    adversary = AutoAttack(model, norm="Linf", eps=EPS_8, version=version, device=x.device, seed=seed)
    hits = 0
    for i in _batches(len(y), batch_size, f"eval: autoattack-{version}"):
        _, y_adv = adversary.run_standard_evaluation(
            x[i : i + batch_size], y[i : i + batch_size], batch_size=batch_size
        )
        hits += int((y_adv == y[i : i + batch_size]).sum())
    return hits / len(y)


def evaluate(model: nn.Module, split: ArraySplit, cfg: EvalConfig, device: torch.device, seed: int = 0) -> dict:
    """{attack: {"accuracy", "num_examples", "seconds"}} for each attack of `cfg.attacks`."""
    x, y = test_tensors(split, max(cfg.num_examples, cfg.aa_num_examples), device)
    n_aa = min(cfg.aa_num_examples or cfg.num_examples, len(y))
    x_aa, y_aa, x, y = x[:n_aa], y[:n_aa], x[: cfg.num_examples], y[: cfg.num_examples]
    classifier = AdvBranch(model)
    results = {}
    with mode(model, train=False):
        for name in cfg.attacks:
            start = time.perf_counter()
            if name == "clean":
                acc = clean_accuracy(classifier, x, y, cfg.batch_size)
            elif name == "pgd20":
                acc = pgd_accuracy(classifier, x, y, cfg.batch_size, seed)
            else:
                acc = autoattack_accuracy(classifier, x_aa, y_aa, cfg.batch_size, cfg.aa_version, seed)
            results[name] = {
                "accuracy": acc,
                "num_examples": n_aa if name == "aa" else len(y),
                "seconds": round(time.perf_counter() - start, 2),
            }
    return results


def format_results(results: dict) -> str:
    names = {"clean": "clean", "pgd20": "PGD-20", "aa": "AutoAttack"}
    return "  ".join(f"{names[k]} {100 * v['accuracy']:.2f}% (n={v['num_examples']})" for k, v in results.items())
