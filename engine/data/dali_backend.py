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

from .cifar import ArraySplit, DataError
from .loader import PAD, SIZE, Batch, EpochPlan, PlannedLoader
from .optional import require


def build_pipeline(batch_size: int, device: torch.device, augment: bool, num_threads: int, seed: int):
    """The DALI pipeline: inputs "images" (HWC uint8) and, when augmenting, "start" (y, x) and "flip"."""
    require("dali")
    import nvidia.dali
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import Pipeline

    major = int(nvidia.dali.__version__.split(".")[0])
    if major < 2:  # exec_dynamic and stream-ordered share_outputs: an older DALI left in place by the installer
        raise DataError(
            f"DALI {nvidia.dali.__version__} is older than this loader needs (2.x, pinned 2.4.0 in "
            "constraints/cpu.txt): pip install -c constraints/cpu.txt nvidia-dali-cuda130"
        )

    on_gpu = device.type == "cuda"
    device_id = (device.index if device.index is not None else torch.cuda.current_device()) if on_gpu else None
    # seed: DALI's own generators, unused here (the plan supplies every random choice). Queue depth 1: each
    # schedule_run then runs exactly the one batch just fed (a deeper queue runs that many on the first call). The
    # dynamic executor (DALI's default since 2.0, named so an older default cannot change it) hands outputs over in
    # a CUDA stream's order (`DALILoader._take`): the host does not wait for each batch.
    pipe = Pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                    prefetch_queue_depth=1, exec_dynamic=True)  # fmt: skip
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
        try:
            self.pipe.build()
        except RuntimeError as e:  # on a GPU: a DALI wheel for another CUDA than the driver's, or no device memory
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            hint = ""
            if self.device.type == "cuda":
                hint = "check that the nvidia-dali wheel matches the driver's CUDA (nvidia-smi), or "
            raise DataError(
                f"DALI could not build its pipeline on {self.device} ({first}); {hint}use data.backend=device"
            ) from None

    def _feed(self, plan: EpochPlan, b: int) -> None:
        sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
        self.pipe.feed_input("images", self.images[plan.order[sl]])
        if self.augment:
            start = np.stack([plan.dy[sl], plan.dx[sl]], axis=1).astype(np.int32) - PAD  # (B, 2)
            self.pipe.feed_input("start", start)
            self.pipe.feed_input("flip", plan.flip[sl].astype(np.int32))
        self.pipe.schedule_run()

    def _take(self) -> torch.Tensor:
        """The finished run's output (a DALI TensorList on the CPU or GPU) copied into a new uint8 tensor.

        On CUDA the output is shared in the order of torch's current stream: that stream waits for DALI's work on
        the device, the host does not (without a stream, share_outputs blocks until the batch is done, once per
        batch). The copy is queued on the same stream, and the dynamic executor frees the buffer in that stream's
        order, after the copy: a later run cannot overwrite it first, however far the stream lags."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        (images,) = self.pipe.share_outputs(stream)
        dense = images.as_tensor()  # (B, 32, 32, 3)
        out = torch.empty(dense.shape(), dtype=torch.uint8, device=self.device)
        feed_ndarray(dense, out, cuda_stream=stream)
        self.pipe.release_outputs()
        return out

    def __iter__(self) -> Iterator[Batch]:
        plan, num_batches = self.plan(), len(self)
        order = torch.from_numpy(plan.order).to(self.device)
        in_flight = num_batches > 0
        if in_flight:
            self._feed(plan, 0)
        try:
            for b in range(num_batches):
                hwc = self._take()
                in_flight = b + 1 < num_batches
                if in_flight:  # DALI prepares the next batch while the trainer works on this one
                    self._feed(plan, b + 1)
                yield self.finish(hwc, self.labels[order[b * self.batch_size : (b + 1) * self.batch_size]])
        finally:  # a loop left early: collect the run still in flight so the next epoch starts clean
            if in_flight:
                self._take()


def make_loader(split: ArraySplit, batch_size: int, *, train: bool, device: torch.device, **kwargs) -> DALILoader:
    return DALILoader(split, batch_size, device, train=train, **kwargs)
