"""Data: official CIFAR readers, the loader interface, and the backends that implement it."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import DataConfig
from .cifar import ArraySplit, DataError, find_layout, how_to_get, load_split
from .loader import Batch, DeviceLoader, Loader, to_unit_interval
from .synthetic import synthetic_split

__all__ = [
    "ArraySplit",
    "Batch",
    "DataError",
    "DeviceLoader",
    "Loader",
    "build_loaders",
    "data_source",
    "load_splits",
    "load_test_split",
    "to_unit_interval",
]


def resolve_dataset(cfg: DataConfig) -> str:
    """The dataset actually used: the configured one, or synthetic when allowed and the real one is absent."""
    if cfg.dataset != "synthetic" and cfg.synthetic_fallback and find_layout(cfg.dataset, cfg.data_dir) is None:
        return "synthetic"
    return cfg.dataset


def _load(cfg: DataConfig, seed: int, train: bool, dataset: str | None = None) -> ArraySplit:
    dataset = dataset or resolve_dataset(cfg)
    if dataset == "synthetic":  # the test split is drawn from the same class prototypes, other images
        size = cfg.synthetic_size if train else max(cfg.synthetic_size // 4, 64)
        split = synthetic_split(size, cfg.num_classes, seed, image_seed=seed + (0 if train else 1))
    else:
        split = load_split(dataset, cfg.data_dir, train)
    return split.head(cfg.train_subset if train else cfg.test_subset)


def load_splits(cfg: DataConfig, seed: int, dataset: str | None = None) -> tuple[ArraySplit, ArraySplit]:
    """(train, test) of one dataset, `dataset` if given (`resolve_dataset`'s, read once by the caller that records
    it): where the real one appears between the two reads (prepared meanwhile), both are still the synthetic
    stand-in, not synthetic training with real test images."""
    dataset = dataset or resolve_dataset(cfg)
    return _load(cfg, seed, True, dataset), _load(cfg, seed, False, dataset)


def load_test_split(cfg: DataConfig, seed: int, dataset: str | None = None) -> ArraySplit:
    return _load(cfg, seed, False, dataset)


def build_loaders(
    cfg: DataConfig,
    train: ArraySplit,
    test: ArraySplit | None,
    batch_size: int,
    eval_batch_size: int,
    device: torch.device,
    seed: int,
    channels_last: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[Loader, Loader | None]:
    """(train, test) loaders of the configured backend over splits from `load_splits`; `test=None`: no test loader
    (training needs none: the evaluation reads the test split itself)."""
    if cfg.backend != "device":
        from . import backends  # optional dependencies: imported only when asked for

        return backends.build(
            cfg, train, test, batch_size, eval_batch_size, device, seed, channels_last, rank, world_size
        )
    common = dict(device=device, seed=seed, channels_last=channels_last)
    train_loader = DeviceLoader(
        train,
        batch_size,
        train=True,
        drop_last=cfg.drop_last,
        augment=cfg.augment,
        rank=rank,
        world_size=world_size,
        **common,
    )
    test_loader = None if test is None else DeviceLoader(test, eval_batch_size, train=False, **common)
    return train_loader, test_loader


def data_source(cfg: DataConfig) -> str:
    """Where this process's data comes from, in a few words: `cifar10 in /abs/data`, or the synthetic stand-in."""
    folder = Path(cfg.data_dir).resolve()
    if cfg.dataset == "synthetic":
        return "synthetic data"
    if resolve_dataset(cfg) == "synthetic":
        return f"synthetic data (no {cfg.dataset} under {folder}: data.synthetic_fallback)"
    return f"{cfg.dataset} in {folder}"


def data_notice(cfg: DataConfig, dataset: str | None = None) -> str | None:
    """One line to print when the run silently would not use what the user asked for (`dataset`: what the caller
    resolved once and uses, else resolved here)."""
    if (dataset or resolve_dataset(cfg)) != cfg.dataset:
        hint = how_to_get(cfg.dataset, Path(cfg.data_dir))
        return f"note: no {cfg.dataset} under {cfg.data_dir}; using synthetic data ({hint})"
    return None
