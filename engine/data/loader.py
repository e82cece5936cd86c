"""The loader interface every data backend implements, and the embedded default: a device-resident loader.

Semantics shared by all backends: random crop 32 with 4-pixel zero padding and horizontal flip (p = 0.5) on the
training split, uint8 -> float in [0, 1] with no normalization, (B, 3, 32, 32) output on the training device
(channels-last unless asked otherwise), int64 labels, a full seeded permutation per epoch (sharded by rank), and the
test split in order without augmentation.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from .cifar import ArraySplit

PAD = 4
SIZE = 32
Batch = tuple[torch.Tensor, torch.Tensor]  # (B, 3, 32, 32) float in [0, 1], (B,) int64


_UNIT_TABLES: dict[torch.device, torch.Tensor] = {}


def to_unit_interval(u8: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 u / 255, same shape and layout, the same bits on every device. Dividing on the device
    is not: CUDA divides by a host scalar as u * fl(1/255), one bit off the CPU's quotient for 126 of the 256
    values. The CPU's 256 quotients, looked up on the device, are exact everywhere."""
    table = _UNIT_TABLES.get(u8.device)
    if table is None:
        table = _UNIT_TABLES[u8.device] = torch.arange(256, dtype=torch.uint8).float().div_(255).to(u8.device)
    return table[u8.long()]  # (an int32 index is widened to int64 inside indexing anyway)


class Loader(Protocol):
    """What the trainer needs from a data backend."""

    batch_size: int
    num_images: int  # images this rank sees per epoch
    num_total: int  # images in the split (every rank's together, without padding)

    def __len__(self) -> int: ...  # batches per epoch

    def __iter__(self) -> Iterator[Batch]: ...

    def set_epoch(self, epoch: int) -> None: ...  # 1-based; fixes the permutation and augmentation


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator that depends only on (seed, epoch): resumed runs and every backend draw the same stream."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def per_rank_images(num: int, world_size: int, drop_last: bool = True) -> int:
    """Each rank's equal share of an epoch of `num` images: the remainder of num / world_size dropped (as
    DistributedSampler with drop_last=True), or, without drop_last, the epoch padded by its own first images so
    every image comes at least once (as DistributedSampler's default)."""
    return num // world_size if drop_last else -(-num // world_size)


def shard(num: int, rank: int, world_size: int, drop_last: bool = True) -> slice:
    """This rank's share of an epoch's permutation (padded as `per_rank_images` says): every world_size-th place
    from `rank` on, as DistributedSampler takes, so that step k's batches of the ranks together are one process's
    batch k at world_size times the batch (and drop what it drops). Contiguous blocks (before 2026-12-07) trained
    other groupings of images than one process (helper-147)."""
    per_rank = per_rank_images(num, world_size, drop_last)
    return slice(rank, per_rank * world_size, world_size)


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


@dataclass
class EpochPlan:
    """Which images this rank loads this epoch, in order, and how each is augmented (None: no augmentation)."""

    order: np.ndarray  # (M,) int64 indices into the split
    dy: np.ndarray | None = None  # (M,) int64 crop offset into the zero-padded image, in [0, 2*PAD]
    dx: np.ndarray | None = None
    flip: np.ndarray | None = None  # (M,) bool


class PlannedLoader:
    """Bookkeeping shared by every backend: sizes, the epoch, its plan, and the final uint8 -> float step."""

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
        self.num_images = per_rank_images(self.num_total, world_size, self.drop_last) if train else self.num_total
        self.epoch = 1

    def __len__(self) -> int:
        full, rest = divmod(self.num_images, self.batch_size)
        return full + (rest > 0 and not self.drop_last)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def plan(self) -> EpochPlan:
        """This epoch's plan (the same for every backend, given seed, epoch, rank and world size)."""
        used = min(len(self) * self.batch_size, self.num_images)  # drop_last cuts the partial tail here
        if not self.train:
            return EpochPlan(np.arange(used, dtype=np.int64))
        gen = epoch_generator(self.seed, self.epoch)
        mine = shard(self.num_total, self.rank, self.world_size, self.drop_last)
        # the epoch's places: the permutation, padded by its own start where ranks without drop_last need more
        places = torch.arange(self.num_images * self.world_size) % self.num_total
        order = torch.randperm(self.num_total, generator=gen)[places][mine]
        if not self.augment:
            return EpochPlan(order[:used].numpy())
        # drawn for the whole permutation, then sharded like it: drawn per shard from the same generator state,
        # every rank's j-th image took the same crop and flip (one process: the same draws as before)
        dy, dx, flip = (t[places][mine][:used].numpy() for t in draw_augmentation(gen, self.num_total))
        return EpochPlan(order[:used].numpy(), dy, dx, flip)

    def finish(self, hwc: torch.Tensor, labels: torch.Tensor) -> Batch:
        """(B, 32, 32, 3) uint8 on the device -> (B, 3, 32, 32) float in [0, 1], as `DeviceLoader` computes it."""
        x = to_unit_interval(hwc.to(self.device, non_blocking=True)).permute(0, 3, 1, 2)  # channels-last strides
        x = x if self.channels_last else x.contiguous()
        # copy=True: a backend may hand out labels in a buffer it reuses a few batches later
        return x, labels.reshape(-1).to(self.device, torch.int64, non_blocking=True, copy=True)


class DeviceLoader(PlannedLoader):
    """The whole uint8 split lives on the training device; shuffling and augmentation run there in batches."""

    def __init__(self, split: ArraySplit, batch_size: int, device: torch.device, **kwargs):
        super().__init__(split, batch_size, device, **kwargs)
        images = torch.from_numpy(np.ascontiguousarray(split.images))  # (N, 32, 32, 3) uint8
        if self.augment:
            images = torch.nn.functional.pad(images, (0, 0, PAD, PAD, PAD, PAD))  # (N, 40, 40, 3), zero border
        self.images = images.to(self.device)
        self.labels = torch.from_numpy(split.labels).to(self.device)

    def __iter__(self) -> Iterator[Batch]:
        plan = self.plan()
        columns = [plan.order] + ([plan.dy, plan.dx, plan.flip] if self.augment else [])
        columns = [torch.from_numpy(c).to(self.device) for c in columns]
        for b in range(len(self)):
            sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
            idx = columns[0][sl]
            hwc = crop_flip(self.images, idx, *(c[sl] for c in columns[1:])) if self.augment else self.images[idx]
            yield self.finish(hwc, self.labels[idx])
