"""Optional data backends (FFCV, NVIDIA DALI) behind the `Loader` interface, and what they share.

Every backend follows one plan per epoch, drawn exactly as `DeviceLoader` draws it: a permutation from
`epoch_generator(seed, epoch)`, sharded by rank, then per-image shifts and flips from the same generator. The
backends only differ in who moves and augments the pixels (a numba kernel inside FFCV's pipeline, DALI operators),
so for a given (seed, epoch, rank, world_size) every backend yields the same batches, bit for bit.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import numpy as np
import torch

from ..config import DataConfig
from .cifar import ArraySplit, DataError
from .loader import Batch, Loader, draw_augmentation, epoch_generator, shard

INSTALL = {
    "ffcv": (
        "FFCV is not installed: run `bash scripts/install_data_backends.sh ffcv` (apt-get install libopencv-dev "
        "libturbojpeg0-dev pkg-config g++; pip install --no-deps ffcv==1.0.2; pip install numba "
        "opencv-python-headless pillow terminaltables fastargs assertpy psutil)"
    ),
    "dali": (
        "NVIDIA DALI is not installed: run `bash scripts/install_data_backends.sh dali` "
        "(pip install nvidia-dali-cuda130)"
    ),
}
MODULES = {"ffcv": "ffcv.loader", "dali": "nvidia.dali"}


def require(backend: str) -> None:
    """Import the backend's package or raise a one-line `DataError` saying how to install it."""
    threads = torch.get_num_threads()
    try:
        importlib.import_module(MODULES[backend])
    except ImportError as e:  # also a broken install, e.g. FFCV's extension without its system libraries
        raise DataError(f"{INSTALL[backend]} [{type(e).__name__}: {e}]") from None
    finally:
        if torch.get_num_threads() != threads:  # importing FFCV sets torch's thread count to 1
            torch.set_num_threads(threads)


def available(backend: str) -> bool:
    try:
        require(backend)
    except DataError:
        return False
    return True


@dataclass
class EpochPlan:
    """Which images this rank loads this epoch, in order, and how each is augmented (None: no augmentation)."""

    order: np.ndarray  # (M,) int64 indices into the split
    dy: np.ndarray | None = None  # (M,) int64 crop offset into the zero-padded image, in [0, 2*PAD]
    dx: np.ndarray | None = None
    flip: np.ndarray | None = None  # (M,) bool


class PlannedLoader:
    """Bookkeeping shared by the backends: sizes, the epoch, its plan, and the final uint8 -> float step."""

    def __init__(
        self,
        split: ArraySplit,
        batch_size: int,
        device: torch.device,
        *,
        train: bool,
        seed: int = 0,
        drop_last: bool = True,
        augment: bool = True,
        channels_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: use a positive batch size")
        self.batch_size, self.device, self.train, self.seed = batch_size, torch.device(device), train, seed
        self.augment, self.channels_last = augment and train, channels_last
        self.rank, self.world_size = rank, world_size
        self.drop_last = drop_last and train
        self.num_total = len(split)
        self.num_images = self.num_total // world_size if train else self.num_total
        self.epoch = 1

    def __len__(self) -> int:
        full, rest = divmod(self.num_images, self.batch_size)
        return full + (rest > 0 and not self.drop_last)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def plan(self) -> EpochPlan:
        """This epoch's plan: the same draws, in the same order, as `DeviceLoader._epoch_plan`."""
        used = min(len(self) * self.batch_size, self.num_images)  # drop_last cuts the partial tail here
        if not self.train:
            return EpochPlan(np.arange(used, dtype=np.int64))
        gen = epoch_generator(self.seed, self.epoch)
        order = torch.randperm(self.num_total, generator=gen)[shard(self.num_total, self.rank, self.world_size)]
        if not self.augment:
            return EpochPlan(order[:used].numpy())
        dy, dx, flip = (t[:used].numpy() for t in draw_augmentation(gen, len(order)))
        return EpochPlan(order[:used].numpy(), dy, dx, flip)

    def finish(self, hwc: torch.Tensor, labels: torch.Tensor) -> Batch:
        """(B, 32, 32, 3) uint8 on the device -> (B, 3, 32, 32) float in [0, 1], as `DeviceLoader` computes it."""
        x = hwc.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
        x = x if self.channels_last else x.contiguous()
        # copy=True: a backend may hand out labels in a buffer it reuses a few batches later
        return x, labels.reshape(-1).to(self.device, torch.int64, non_blocking=True, copy=True)


def build(
    cfg: DataConfig,
    train: ArraySplit,
    test: ArraySplit,
    batch_size: int,
    eval_batch_size: int,
    device: torch.device,
    seed: int,
    channels_last: bool,
    rank: int,
    world_size: int,
) -> tuple[Loader, Loader]:
    """(train, test) loaders of `cfg.backend` ("ffcv" or "dali")."""
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
    test_loader = module.make_loader(test, eval_batch_size, train=False, **common)
    return train_loader, test_loader
