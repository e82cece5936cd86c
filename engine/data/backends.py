"""Optional data backends (FFCV, NVIDIA DALI) behind the `Loader` interface, and what they share.

Every backend follows one plan per epoch, drawn exactly as `DeviceLoader` draws it: a permutation from
`epoch_generator(seed, epoch)`, sharded by rank, then per-image shifts and flips from the same generator. The
backends only differ in who moves and augments the pixels (a numba kernel inside FFCV's pipeline, DALI operators),
so for a given (seed, epoch, rank, world_size) every backend yields the same batches, bit for bit.
"""

from __future__ import annotations

import torch

from ..config import DataConfig
from .cifar import ArraySplit
from .loader import Loader
from .optional import INSTALL, MODULES, available, require

__all__ = ["INSTALL", "MODULES", "available", "build", "require"]


def build(
    cfg: DataConfig,
    train: ArraySplit,
    test: ArraySplit | None,
    batch_size: int,
    eval_batch_size: int,
    device: torch.device,
    seed: int,
    channels_last: bool,
    rank: int,
    world_size: int,
) -> tuple[Loader, Loader | None]:
    """(train, test) loaders of `cfg.backend` ("ffcv" or "dali"); no test loader for `test=None`."""
    if cfg.backend not in INSTALL:
        raise ValueError(f"data.backend={cfg.backend!r} is not an optional backend (ffcv, dali)")
    require(cfg.backend)
    if cfg.backend == "ffcv":
        from . import ffcv_backend as module
    else:
        from . import dali_backend as module
    common = dict(device=device, seed=seed, channels_last=channels_last)
    train_loader = module.make_loader(
        train,
        batch_size,
        train=True,
        drop_last=cfg.drop_last,
        augment=cfg.augment,
        rank=rank,
        world_size=world_size,
        **common,
    )
    test_loader = None if test is None else module.make_loader(test, eval_batch_size, train=False, **common)
    return train_loader, test_loader
