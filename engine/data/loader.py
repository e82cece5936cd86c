"""The loader interface every data backend implements, and the embedded default: a device-resident loader.

Semantics shared by all backends: random crop 32 with 4-pixel zero padding and horizontal flip (p = 0.5) on the
training split, uint8 -> float in [0, 1] with no normalization, (B, 3, 32, 32) output on the training device
(channels-last unless asked otherwise), int64 labels, a full seeded permutation per epoch (sharded by rank), and the
test split in order without augmentation.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch

from .cifar import ArraySplit

PAD = 4
SIZE = 32
Batch = tuple[torch.Tensor, torch.Tensor]  # (B, 3, 32, 32) float in [0, 1], (B,) int64


class Loader(Protocol):
    """What the trainer needs from a data backend."""

    batch_size: int
    num_images: int  # images this rank sees per epoch

    def __len__(self) -> int: ...  # batches per epoch

    def __iter__(self) -> Iterator[Batch]: ...

    def set_epoch(self, epoch: int) -> None: ...  # 1-based; fixes the permutation and augmentation


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator that depends only on (seed, epoch): resumed runs and every backend draw the same stream."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def shard(num: int, rank: int, world_size: int) -> slice:
    """This rank's equal share of an epoch's permutation (the remainder is dropped, as DistributedSampler does)."""
    per_rank = num // world_size
    return slice(rank * per_rank, (rank + 1) * per_rank)


def draw_augmentation(gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image shifts dy, dx in [0, 2*PAD] (offset into the padded image) and flip flags, uniform."""
    shifts = torch.randint(0, 2 * PAD + 1, (2, n), generator=gen)
    flips = torch.rand(n, generator=gen) < 0.5
    return shifts[0], shifts[1], flips


def crop_flip(padded: torch.Tensor, idx: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor):
    """Batched crop + flip by gather from zero-padded HWC uint8 images (N, 40, 40, 3) -> (B, 32, 32, 3)."""
    ar = torch.arange(SIZE, device=padded.device)
    rows = dy[:, None] + ar  # (B, 32)
    cols = dx[:, None] + torch.where(flip[:, None], SIZE - 1 - ar, ar)  # (B, 32)
    return padded[idx[:, None, None], rows[:, :, None], cols[:, None, :]]


class DeviceLoader:
    """The whole uint8 split lives on the training device; shuffling and augmentation run there in batches."""

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
        self.batch_size, self.device, self.train, self.seed = batch_size, device, train, seed
        self.augment, self.channels_last = augment and train, channels_last
        self.rank, self.world_size = rank, world_size
        self.drop_last = drop_last and train
        images = torch.from_numpy(np.ascontiguousarray(split.images))  # (N, 32, 32, 3) uint8
        if self.augment:
            images = torch.nn.functional.pad(images, (0, 0, PAD, PAD, PAD, PAD))  # (N, 40, 40, 3), zero border
        self.images = images.to(device)
        self.labels = torch.from_numpy(split.labels).to(device)
        self.num_images = len(split) // world_size if train else len(split)
        self.epoch = 1

    def __len__(self) -> int:
        full, rest = divmod(self.num_images, self.batch_size)
        return full + (rest > 0 and not self.drop_last)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _epoch_plan(self) -> tuple[torch.Tensor, ...]:
        if not self.train:
            return (torch.arange(self.num_images),)
        gen = epoch_generator(self.seed, self.epoch)
        order = torch.randperm(len(self.labels), generator=gen)[shard(len(self.labels), self.rank, self.world_size)]
        return (order, *draw_augmentation(gen, len(order))) if self.augment else (order,)

    def _to_float(self, hwc: torch.Tensor) -> torch.Tensor:
        x = hwc.permute(0, 3, 1, 2).float().div_(255)  # channels-last strides for free
        return x if self.channels_last else x.contiguous()

    def __iter__(self) -> Iterator[Batch]:
        plan = [t.to(self.device) for t in self._epoch_plan()]
        for b in range(len(self)):
            sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
            idx = plan[0][sl]
            hwc = crop_flip(self.images, idx, *(t[sl] for t in plan[1:])) if self.augment else self.images[idx]
            yield self._to_float(hwc), self.labels[idx]
