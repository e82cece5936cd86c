"""NVIDIA DALI backend: in-memory uint8 batches fed through `fn.external_source`, cropped and flipped by DALI
operators (on the GPU when training on CUDA: the batch is copied there inside the pipeline, "mixed" style).

The crop is `fn.slice` at an absolute start of (dy - 4, dx - 4) with `out_of_bounds_policy="pad"` and zero fill,
which is exactly a 32x32 window of the 4-pixel zero-padded image; `fn.flip(horizontal=...)` mirrors it. The start
and flip of each image are fed in from the epoch plan (`loader.PlannedLoader`) instead of drawn by DALI's random
operators, so DALI batches equal the other backends' for the same seed and epoch, and resumed runs repeat them.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from .cifar import ArraySplit
from .loader import PAD, SIZE, Batch, EpochPlan, PlannedLoader
from .optional import require


def build_pipeline(batch_size: int, device: torch.device, augment: bool, num_threads: int, seed: int):
    """The DALI pipeline: inputs "images" (HWC uint8) and, when augmenting, "start" (y, x) and "flip"."""
    require("dali")
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import Pipeline

    on_gpu = device.type == "cuda"
    device_id = (device.index if device.index is not None else torch.cuda.current_device()) if on_gpu else None
    # seed: DALI's own generators, unused here (the plan supplies every random choice). Queue depth 1: each
    # schedule_run then runs exactly the one batch just fed (a deeper queue runs that many on the first call).
    pipe = Pipeline(
        batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed, prefetch_queue_depth=1
    )
    with pipe:
        images = fn.external_source(name="images", device="cpu", layout="HWC", dtype=types.UINT8, ndim=3)
        images = images.gpu() if on_gpu else images
        if augment:
            start = fn.external_source(name="start", device="cpu", dtype=types.INT32, ndim=1)  # (2,): y, x
            flip = fn.external_source(name="flip", device="cpu", dtype=types.INT32, ndim=0)
            images = fn.slice(
                images, start=start, shape=[SIZE, SIZE], axis_names="HW", out_of_bounds_policy="pad", fill_values=0
            )
            images = fn.flip(images, horizontal=flip, vertical=0)
        pipe.set_outputs(images)
    return pipe


class DALILoader(PlannedLoader):
    """`Loader` over an in-memory split; labels are gathered by the same plan outside DALI (nothing to do there)."""

    def __init__(self, split: ArraySplit, batch_size: int, device: torch.device, *, num_threads: int = 0, **kwargs):
        super().__init__(split, batch_size, device, **kwargs)
        self.images = np.ascontiguousarray(split.images)  # (N, 32, 32, 3) uint8
        self.labels = torch.from_numpy(split.labels).to(self.device)
        threads = num_threads or torch.get_num_threads()
        self.pipe = build_pipeline(batch_size, self.device, self.augment, threads, self.seed)
        self.pipe.build()

    def _feed(self, plan: EpochPlan, b: int) -> None:
        sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
        self.pipe.feed_input("images", self.images[plan.order[sl]])
        if self.augment:
            start = np.stack([plan.dy[sl], plan.dx[sl]], axis=1).astype(np.int32) - PAD  # (B, 2)
            self.pipe.feed_input("start", start)
            self.pipe.feed_input("flip", plan.flip[sl].astype(np.int32))
        self.pipe.schedule_run()

    def _to_torch(self, images) -> torch.Tensor:
        """The pipeline's output (a DALI TensorList on the CPU or GPU) copied into a new uint8 tensor."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dense = images.as_tensor()  # (B, 32, 32, 3)
        out = torch.empty(dense.shape(), dtype=torch.uint8, device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        return feed_ndarray(dense, out, cuda_stream=stream)  # ordered after DALI's work, on torch's stream

    def __iter__(self) -> Iterator[Batch]:
        plan, num_batches = self.plan(), len(self)
        order = torch.from_numpy(plan.order).to(self.device)
        in_flight = num_batches > 0
        if in_flight:
            self._feed(plan, 0)
        try:
            for b in range(num_batches):
                (images,) = self.pipe.share_outputs()
                hwc = self._to_torch(images)
                self.pipe.release_outputs()
                in_flight = b + 1 < num_batches
                if in_flight:  # DALI prepares the next batch while the trainer works on this one
                    self._feed(plan, b + 1)
                yield self.finish(hwc, self.labels[order[b * self.batch_size : (b + 1) * self.batch_size]])
        finally:  # a loop left early: collect the run still in flight so the next epoch starts clean
            if in_flight:
                self.pipe.share_outputs()
                self.pipe.release_outputs()


def make_loader(split: ArraySplit, batch_size: int, *, train: bool, device: torch.device, **kwargs) -> DALILoader:
    return DALILoader(split, batch_size, device, train=train, **kwargs)
