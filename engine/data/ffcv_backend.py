"""FFCV backend: each split written once as a .beton of raw uint8 pixels (cached by content hash), read by FFCV's
compiled pipeline, with the crop/flip done by a numba kernel inside that pipeline.

Order and augmentation follow the epoch plan of `loader.PlannedLoader` (the draws `DeviceLoader` makes), not
FFCV's own RNG: FFCV 1.0.2's `RandomTranslate(padding=4)` and `RandomHorizontalFlip()` have the same distribution
(uniform offsets in [0, 8] into the zero-padded image, p = 0.5) but draw from numba's per-thread generators, which
FFCV 1.0.2 never seeds, so runs with them would not be reproducible.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..locks import held_if_possible
from .cifar import ArraySplit, DataError, load_split
from .loader import PAD, SIZE, Batch, PlannedLoader
from .optional import require

try:
    from numba import prange
except ImportError:  # numba comes with FFCV; without it nothing here is ever compiled
    prange = range

BETON_FORMAT = "rgb-raw+int64/v1"  # part of the cache key: change it when the written layout changes


def cache_dir() -> Path:
    """Where `build` keeps betons: $ARAT_CACHE_DIR/ffcv, default ~/.cache/arat/ffcv."""
    return Path(os.environ.get("ARAT_CACHE_DIR", Path.home() / ".cache" / "arat")) / "ffcv"


def split_digest(split: ArraySplit) -> str:
    """Content hash of a split: two runs on the same images and labels share one beton."""
    h = hashlib.blake2b(digest_size=10)
    h.update(f"{BETON_FORMAT}:{split.images.shape}".encode())
    h.update(np.ascontiguousarray(split.images).data)
    h.update(np.ascontiguousarray(split.labels, dtype=np.int64).data)
    return h.hexdigest()


def _check_split(split: ArraySplit) -> None:
    # FFCV's writer waits forever when a worker process dies on a bad sample: refuse bad input up front
    if len(split) == 0 or split.images.shape != (len(split), SIZE, SIZE, 3) or split.images.dtype != np.uint8:
        raise ValueError(
            f"cannot write a beton of images {split.images.shape} {split.images.dtype}: "
            f"expected a non-empty (N, {SIZE}, {SIZE}, 3) uint8 array (an engine.data ArraySplit)"
        )


# Prepended to the writer (below). It runs in a session of its own, to be killed as a group with FFCV's workers, so a
# parent killed outright (SIGKILL, the OOM killer, a CI job's cancel) would leave it and its workers running, a stuck
# one forever: a thread watching for its parent to change kills the group then (it only sleeps between looks, holding
# no lock when FFCV forks). And `-c` puts the working directory first on sys.path, where a folder named like a
# module (a cloned `ffcv/`) would win.
_GUARD = """
import os, signal, sys, threading, time

if sys.path and sys.path[0] == "":
    del sys.path[0]
_parent = os.getppid()


def _orphaned():
    while os.getppid() == _parent:
        time.sleep(0.5)
    os.killpg(0, signal.SIGKILL)


threading.Thread(target=_orphaned, daemon=True).start()
"""
# FFCV's writer, run in a fresh interpreter: it forks its worker processes, and a fork of a process whose other
# threads hold locks (torch's pools, DALI's, a test runner's) can leave a worker stuck, while the writer polls its
# progress counter forever (a CI run hung so for 900 s, 2026-12-06). A fresh interpreter forks with no such thread.
_WRITER = """
import sys
import numpy as np
from ffcv.fields import IntField, RGBImageField
from ffcv.writer import DatasetWriter

arrays = np.load(sys.argv[1])
images, labels = arrays["images"], arrays["labels"]


class Split:  # sample i -> (HWC uint8 image, int label)
    def __len__(self):
        return len(labels)

    def __getitem__(self, i):
        return images[i], int(labels[i])


fields = {"image": RGBImageField(write_mode="raw"), "label": IntField()}
DatasetWriter(sys.argv[2], fields, num_workers=int(sys.argv[3])).from_indexed_dataset(Split(), chunksize=1000)
"""
WRITE_TRIES = 2  # a writer stuck past its time is killed and run once more (a stuck fork is rare, not repeatable)


def write_seconds(num_images: int) -> float:
    """How long a beton write may take before it counts as stuck: ~10 s per 50k raw images when healthy. Both tries
    of both CIFAR splits fit in a test's 900 s."""
    return 60.0 + num_images / 500


def _run_writer(command: list[str], limit: float) -> int | None:
    """The writer's exit status, or None when it ran past `limit`. It runs in a session of its own, and it and every
    process it started (FFCV's workers, which outlive a killed writer, waiting on their queue forever) are killed
    when it ends, is stuck, or this process is interrupted."""
    writer = subprocess.Popen(command, stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        return writer.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        return None
    finally:
        with contextlib.suppress(ProcessLookupError):  # ended with its workers, as a healthy write does
            os.killpg(writer.pid, signal.SIGKILL)
        writer.wait()


def _sweep_stale(path: Path, limit: float) -> None:
    """Remove the temporary files of earlier writes of `path` whose process was killed outright (SIGKILL, the OOM
    killer): their names are unique, so nothing else ever would. Only files older than any live write can be."""
    cutoff = time.time() - WRITE_TRIES * limit - 600
    for kind in (".tmp*", ".arrays*"):
        for f in path.parent.glob(glob.escape(path.name) + kind):
            with contextlib.suppress(OSError):  # removed by another process meanwhile
                if f.stat().st_mtime < cutoff:
                    f.unlink()


def write_beton(split: ArraySplit, path: Path) -> Path:
    """Write `split` to `path` unless it is already there (written to a temporary name in a fresh interpreter,
    synced, then renamed)."""
    if path.is_file():
        return path
    require("ffcv")
    _check_split(split)
    path.parent.mkdir(parents=True, exist_ok=True)
    # one writer per beton: torchrun's ranks all build their loaders at once, and each wrote the same file (N
    # writers of 4 processes each, N temporary copies); the others wait, then find it written
    with _writer_lock(path, WRITE_TRIES * write_seconds(len(split)) + 60):
        if path.is_file():
            return path
        _write_beton(split, path)
    return path


def _writer_lock(path: Path, wait_s: float):
    """An exclusive lock beside `path` for up to `wait_s` (a holder stopped or hung: then each writes its own
    temporary copy, which the atomic rename makes safe, as without a lock); none where the folder takes no lock
    (NFS without lockd; on NFS another user's lock file, which this process opens only for reading)."""
    return held_if_possible(path.with_name(f".{path.name}.lock"), wait_s)


def _write_beton(split: ArraySplit, path: Path) -> None:
    limit = write_seconds(len(split))
    _sweep_stale(path, limit)
    unique = f"{os.getpid()}-{secrets.token_hex(4)}"  # unique on a shared cache too
    tmp, arrays = path.with_name(f"{path.name}.tmp{unique}"), path.with_name(f"{path.name}.arrays{unique}.npz")
    command = [sys.executable, "-c", _GUARD + _WRITER, str(arrays), str(tmp), str(min(4, os.cpu_count() or 1))]
    try:
        np.savez(arrays, images=np.ascontiguousarray(split.images), labels=np.asarray(split.labels, dtype=np.int64))
        for _ in range(WRITE_TRIES):
            tmp.unlink(missing_ok=True)
            status = _run_writer(command, limit)
            if status is not None:
                break
        else:
            raise DataError(
                f"FFCV's writer did not finish {path.name} in {limit:.0f} s, twice; "
                "use data.backend=device (the same batches) or retry"
            )
        if status != 0:
            how = f"killed by signal {-status}" if status < 0 else f"exit {status}, its error above"
            raise DataError(f"FFCV's writer failed on {path.name} ({how})")
        with open(tmp, "rb") as f:  # on disk before the name says it is whole (a power cut after the rename)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        arrays.unlink(missing_ok=True)


def write_betons(split_train: ArraySplit, split_test: ArraySplit, out_dir: str | Path) -> tuple[Path, Path]:
    """(train, test) betons in `out_dir`, named by content hash and reused when present."""
    out = Path(out_dir)
    return (
        write_beton(split_train, out / f"train-{split_digest(split_train)}.beton"),
        write_beton(split_test, out / f"test-{split_digest(split_test)}.beton"),
    )


def write_betons_from_layout(dataset: str, data_dir: str | Path, out_dir: str | Path) -> tuple[Path, Path]:
    """Betons of an official CIFAR layout (`arat data ffcv --data-dir DIR --out DIR`)."""
    return write_betons(load_split(dataset, data_dir, True), load_split(dataset, data_dir, False), out_dir)


def _crop_flip(images, out, indices, dy, dx, flip):
    """out[i] = crop at (dy, dx) of the zero-padded image of sample indices[i], mirrored if flip: as `crop_flip`."""
    for i in prange(len(indices)):  # (B, 32, 32, 3) uint8 -> (B, 32, 32, 3) uint8
        k = indices[i]
        for r in range(SIZE):
            src_r = r + dy[k] - PAD
            for c in range(SIZE):
                src_c = (SIZE - 1 - c if flip[k] else c) + dx[k] - PAD
                inside = 0 <= src_r < SIZE and 0 <= src_c < SIZE
                for ch in range(3):
                    out[i, r, c, ch] = images[i, src_r, src_c, ch] if inside else 0


@functools.cache
def _crop_flip_kernel(parallel: bool):
    import numba

    # not cache=True: numba's on-disk cache key ignores `parallel`, so the two variants would overwrite each other
    return numba.njit(parallel=parallel, nogil=True)(_crop_flip)


@functools.cache
def _crop_flip_op():
    """The FFCV operation, defined on first use so that this module imports without FFCV."""
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.operation import Operation

    class CropFlip(Operation):
        """Crop/flip by the epoch plan, looked up by dataset index (FFCV passes each batch's indices)."""

        def __init__(self, tables: dict, parallel: bool):
            super().__init__()
            self.parallel = parallel
            self.tables = tables  # {"aug": (dy, dx, flip)}, (N,) uint8 arrays by dataset index, set every epoch

        def generate_code(self):
            kernel, tables = _crop_flip_kernel(self.parallel), self.tables

            def crop_flip(images, dst, indices):
                dst = dst[: len(images)]
                kernel(images, dst, indices, *tables["aug"])
                return dst

            crop_flip.with_indices = True
            return crop_flip

        def declare_state_and_memory(self, previous_state):
            # jit_mode=False: FFCV calls this op from Python, so it sees each epoch's tables (numba would freeze
            # them as constants); the kernel it calls is compiled all the same.
            return replace(previous_state, jit_mode=False), AllocationQuery(previous_state.shape, np.dtype("u1"))

    return CropFlip


def _ffcv_leaves_torch_threads_alone() -> None:
    """FFCV's `Compiler.set_num_threads` sets torch's thread count as well as numba's, and each epoch's loader thread
    calls it as it starts: from that thread, where no check on the trainer's thread sees it, torch's process-wide
    thread state changed (with the native CPU kernels on, an AR-AT run after an FFCV loader had run in the process
    computed other numbers). Patched once, it sets numba's count only; the trainer owns torch's."""
    import numba
    from ffcv.pipeline.compiler import Compiler

    if getattr(Compiler.set_num_threads, "numba_only", False):
        return

    def set_num_threads(cls, n: int) -> None:
        cls.num_threads = n if n >= 1 else numba.config.NUMBA_NUM_THREADS
        numba.set_num_threads(cls.num_threads)

    set_num_threads.numba_only = True
    Compiler.set_num_threads = classmethod(set_num_threads)


def _ffcv_pipelines_use_no_cuda() -> None:
    """FFCV's loader thread wraps each batch in a CUDA stream of its own whenever CUDA exists (`IS_CUDA`, read at
    import). These pipelines run no GPU operation (batches are pinned and copied by torch on the trainer's thread),
    so the streams only cost: made on the loader thread, whose current device is 0, they open a CUDA context on GPU 0
    in every rank of a torchrun (and with perf.device=cuda:N). Off, FFCV treats the pipeline as the CPU one it is."""
    import ffcv.loader.epoch_iterator as epoch_iterator

    epoch_iterator.IS_CUDA = False


class _PlanOrder:
    """FFCV traversal order that returns the order our epoch plan chose (FFCV calls `sample_order(its_epoch)`)."""

    def __init__(self):
        self.order = np.zeros(0, dtype=np.uint64)

    def sample_order(self, epoch: int) -> np.ndarray:
        return self.order


class FFCVLoader(PlannedLoader):
    """`Loader` over a beton: decode (memcpy of raw pixels), crop/flip, ToTensor; on CUDA pinned, copied, to float."""

    def __init__(
        self, split: ArraySplit, beton: Path, batch_size: int, device: torch.device, *, num_threads: int = 0, **kwargs
    ):
        super().__init__(split, batch_size, device, **kwargs)
        require("ffcv")
        import numba
        from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import ToTensor

        _ffcv_leaves_torch_threads_alone()  # importing FFCV set torch's count once (engine.data.optional.require)
        _ffcv_pipelines_use_no_cuda()
        on_cuda = self.device.type == "cuda"
        # On the CPU the training step uses every core, and a batch here is a memcpy and a crop per image: one loader
        # thread, no numba thread pool. On CUDA, as many threads as torch has (at most numba's limit).
        threads = num_threads or (min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS) if on_cuda else 1)
        self.tables: dict = {}
        image_ops = [SimpleRGBImageDecoder()] + ([_crop_flip_op()(self.tables, threads > 1)] if self.augment else [])
        image_ops.append(ToTensor())
        label_ops = [IntDecoder(), ToTensor()]
        # No FFCV ToDevice on CUDA: it copies non-blocking out of FFCV's own pinned slots, which torch does not track,
        # and FFCV's worker rewrites a slot five batches on whether or not the GPU has read it; a host running more
        # than five steps ahead of the GPU (no sync inside a step) would train one batch twice and lose another.
        # Each batch is copied into a fresh block of torch's pinned memory instead (pinned_copy), whose allocator
        # holds it until the copy has run.
        self.pin = on_cuda
        check_beton(beton, self.num_total)
        self.ffcv = Loader(
            str(beton),
            batch_size=batch_size,
            num_workers=threads,
            order=OrderOption.SEQUENTIAL,
            drop_last=False,
            os_cache=True,
            pipelines={"image": image_ops, "label": label_ops},
        )
        # Our plan decides order and length (FFCV's `distributed` needs a process group and its own sampler)
        self.order = self.ffcv.traversal_order = _PlanOrder()
        self.ffcv.first_traversal_order = np.zeros(self.num_images, dtype=np.uint64)

    def _install_plan(self) -> None:
        plan = self.plan()
        if self.augment:  # by dataset index, since that is what FFCV hands the op
            tables = tuple(np.zeros(self.num_total, dtype=np.uint8) for _ in range(3))
            for table, values in zip(tables, (plan.dy, plan.dx, plan.flip), strict=True):
                table[plan.order] = values
            self.tables["aug"] = tables  # one swap: a stray batch of an abandoned epoch sees old or new, not a mix
        self.order.order = plan.order.astype(np.uint64)

    def __iter__(self) -> Iterator[Batch]:
        self._install_plan()
        epoch = iter(self.ffcv)
        try:
            for images, labels in epoch:  # (B, 32, 32, 3) uint8, (B, 1) int64, in FFCV's buffers
                if self.pin:  # ~1.5 MB per batch of 512: a host memcpy, then a non-blocking copy from it
                    images, labels = pinned_copy(images), pinned_copy(labels)
                yield self.finish(images, labels)
        finally:  # FFCV's reader thread only stops when told (a loop left early would leak it)
            epoch.close()


def check_beton(beton: Path, num_images: int) -> None:
    """A file at a beton's name is trusted by its name alone: one FFCV cannot read (cut short, foreign) or that holds
    another number of images than the split is a one-line DataError naming the file to delete (FFCV's reader would
    raise its own traceback on every run). Only the reader is asked: the Loader's pipeline compilation is not."""
    from ffcv.reader import Reader

    def spoilt(why: str) -> DataError:
        return DataError(f"{beton} is not a beton of this split ({why}): delete it and the next run writes it again")

    try:
        reader = Reader(str(beton))
    except Exception as e:  # noqa: BLE001 - FFCV's reader raises many kinds on a truncated or foreign file
        raise spoilt(f"{type(e).__name__} reading it") from None
    if reader.num_samples != num_images:
        raise spoilt(f"{reader.num_samples} images, the split has {num_images}")
    # the allocation table ends the file and says where each image's bytes lie: a file cut short in its data (an
    # interrupted copy) reads its header and count whole, then fails inside FFCV's loader threads
    table, table_at = reader.alloc_table, int(reader.header["alloc_table_ptr"])
    if beton.stat().st_size != table_at + table.nbytes or bool((table["ptr"] + table["size"] > table_at).any()):
        raise spoilt(f"cut short: {beton.stat().st_size} bytes")


def pinned_copy(t: torch.Tensor) -> torch.Tensor:
    """`t` copied into a fresh block of torch's pinned memory, which its allocator keeps until the non-blocking copy
    reading it has run. Not `t.pin_memory()`: with CUDA present FFCV allocates its slots pinned already, and
    pin_memory() of a pinned tensor returns the tensor itself, so the device copy read FFCV's slot, which its worker
    rewrites one batch later when its queue is full."""
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return out.copy_(t)


def make_loader(split: ArraySplit, batch_size: int, *, train: bool, device: torch.device, **kwargs) -> FFCVLoader:
    """FFCV loader of `split`, writing its beton into `cache_dir()` the first time."""
    beton = write_beton(split, cache_dir() / f"{'train' if train else 'test'}-{split_digest(split)}.beton")
    return FFCVLoader(split, beton, batch_size, device, train=train, **kwargs)
