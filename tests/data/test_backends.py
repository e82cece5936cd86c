"""Every data backend (device-resident, FFCV, DALI) against the loader semantics, on the CPU.

The synthetic splits label image i with i, so each output batch says which source image every output came from;
an output must then equal exactly one of the 9 x 9 x 2 allowed crops/flips of that source.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

from engine.config import DataConfig
from engine.data import DeviceLoader, build_loaders, load_splits
from engine.data import backends as data_backends
from engine.data.cifar import ArraySplit, DataError, find_layout, load_split
from engine.data.loader import PAD, SIZE, draw_augmentation, epoch_generator, shard

BACKENDS = ["device", "ffcv", "dali"]
CPU = torch.device("cpu")
NUM_TRAIN, NUM_TEST, BATCH = 640, 250, 64
SEED = 7
CHI2_DF8_P1E4 = 31.8  # chi-square quantile, 8 degrees of freedom, p = 1e-4: a generous bound for 9 uniform bins
DATA_DIR = Path(os.environ.get("ARAT_TEST_DATA", "./data"))


def indexed_split(num: int, seed: int) -> ArraySplit:
    """Random non-zero pixels (so the zero padding shows) and label i for image i."""
    images = np.random.default_rng(seed).integers(1, 256, size=(num, SIZE, SIZE, 3), dtype=np.uint8)
    return ArraySplit(images, np.arange(num, dtype=np.int64))


TRAIN, TEST = indexed_split(NUM_TRAIN, 0), indexed_split(NUM_TEST, 1)


def need(backend: str) -> None:
    if backend != "device" and not data_backends.available(backend):
        pytest.skip(data_backends.INSTALL[backend])


@pytest.fixture(scope="module", autouse=True)
def beton_cache(tmp_path_factory):
    """Betons go to a temporary cache, not ~/.cache/arat."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ARAT_CACHE_DIR", str(tmp_path_factory.mktemp("arat-cache")))
        yield


def make_loaders(
    backend: str,
    train: ArraySplit = TRAIN,
    test: ArraySplit = TEST,
    *,
    batch_size: int = BATCH,
    drop_last: bool = True,
    augment: bool = True,
    channels_last: bool = True,
    rank: int = 0,
    world_size: int = 1,
    seed: int = SEED,
):
    need(backend)
    if backend == "device":
        common = dict(seed=seed, channels_last=channels_last)
        shard = dict(rank=rank, world_size=world_size)
        return (
            DeviceLoader(train, batch_size, CPU, train=True, drop_last=drop_last, augment=augment, **shard, **common),
            DeviceLoader(test, 100, CPU, train=False, **common),
        )
    cfg = DataConfig(dataset="synthetic", backend=backend, drop_last=drop_last, augment=augment)
    return data_backends.build(cfg, train, test, batch_size, 100, CPU, seed, channels_last, rank, world_size)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, 32, 32) float in [0, 1] -> (B, 32, 32, 3) uint8, checking that x is exactly u / 255."""
    u = (x * 255).round().to(torch.uint8)
    assert torch.equal(x, u.float() / 255)
    return u.permute(0, 2, 3, 1).numpy()


def recover_augmentation(out: np.ndarray, source: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dy, dx, flip) of each output, asserting it equals exactly one allowed crop/flip of its source."""
    padded = np.pad(source, ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0)))
    windows = sliding_window_view(padded, (SIZE, SIZE), axis=(1, 2)).transpose(0, 1, 2, 4, 5, 3)  # (B,9,9,32,32,3)
    candidates = np.stack([windows, windows[:, :, :, :, ::-1]], axis=1)  # (B, 2, 9, 9, 32, 32, 3)
    match = (candidates == out[:, None, None, None]).all(axis=(-3, -2, -1))  # (B, 2, 9, 9)
    assert (match.sum(axis=(1, 2, 3)) == 1).all(), "an output is not a 4-pixel zero-padded crop/flip of its source"
    _, flip, dy, dx = np.nonzero(match)
    return dy, dx, flip.astype(bool)


def check_batch(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> None:
    assert x.shape == (batch_size, 3, SIZE, SIZE) and x.dtype == torch.float32 and x.device == CPU
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert y.shape == (batch_size,) and y.dtype == torch.int64


@pytest.fixture(scope="module", params=BACKENDS)
def two_epochs(request):
    """Two training epochs of a backend: per epoch, the labels in order and the recovered augmentation."""
    backend = request.param
    train_loader, _ = make_loaders(backend)
    epochs = []
    for epoch in (1, 2):
        train_loader.set_epoch(epoch)
        labels, dys, dxs, flips = [], [], [], []
        for x, y in train_loader:
            check_batch(x, y, BATCH)
            dy, dx, flip = recover_augmentation(to_uint8(x), TRAIN.images[y.numpy()])
            labels.append(y.numpy()), dys.append(dy), dxs.append(dx), flips.append(flip)
        columns = {"labels": labels, "dy": dys, "dx": dxs, "flip": flips}
        epochs.append({name: np.concatenate(parts) for name, parts in columns.items()})
    return backend, len(train_loader), epochs


def test_every_image_once_per_epoch_in_a_new_order(two_epochs):
    _, num_batches, epochs = two_epochs
    assert num_batches == NUM_TRAIN // BATCH
    for epoch in epochs:
        assert np.array_equal(np.sort(epoch["labels"]), np.arange(NUM_TRAIN))
    assert not np.array_equal(epochs[0]["labels"], epochs[1]["labels"])


def test_shifts_uniform_and_flips_half(two_epochs):
    _, _, epochs = two_epochs
    expected = 2 * NUM_TRAIN / 9
    for name in ("dy", "dx"):
        counts = np.bincount(np.concatenate([e[name] for e in epochs]), minlength=9)
        assert len(counts) == 9 and (counts > 0).all(), f"{name}: some shift in [-4, 4] never occurs"
        chi2 = ((counts - expected) ** 2 / expected).sum()
        assert chi2 < CHI2_DF8_P1E4, f"{name} shifts not uniform: counts {counts.tolist()}, chi2 {chi2:.1f}"
    flips = np.concatenate([e["flip"] for e in epochs])
    assert abs(flips.mean() - 0.5) < 5 * 0.5 / np.sqrt(len(flips)), f"flip rate {flips.mean():.3f}"
    by_image = [e["dy"][np.argsort(e["labels"])] for e in epochs]  # row shift of image 0, 1, ... per epoch
    assert (by_image[0] != by_image[1]).mean() > 0.8, "images keep their shifts across epochs (expected 8/9 change)"


@pytest.mark.parametrize("backend", BACKENDS)
def test_test_split_in_order_unaugmented(backend):
    _, test_loader = make_loaders(backend)
    sizes, images, labels = [], [], []
    for x, y in test_loader:
        sizes.append(len(y)), images.append(to_uint8(x)), labels.append(y.numpy())
        assert x.is_contiguous(memory_format=torch.channels_last) and y.dtype == torch.int64
    assert sizes == [100, 100, 50] and len(test_loader) == 3
    assert np.array_equal(np.concatenate(images), TEST.images)
    assert np.array_equal(np.concatenate(labels), TEST.labels)


@pytest.mark.parametrize("backend", BACKENDS)
def test_drop_last_and_sharding(backend):
    split = indexed_split(600, 2)  # 600 = 9 * 64 + 24
    dropped, kept = make_loaders(backend, split)[0], make_loaders(backend, split, drop_last=False)[0]
    assert len(dropped) == 9 and len(np.unique(np.concatenate([y.numpy() for _, y in dropped]))) == 576
    assert len(kept) == 10 and [len(y) for _, y in kept][-1] == 24
    ranks = [make_loaders(backend, split, rank=r, world_size=2)[0] for r in (0, 1)]
    seen = [np.concatenate([y.numpy() for _, y in loader]) for loader in ranks]
    assert [len(loader) for loader in ranks] == [4, 4] and [r.num_images for r in ranks] == [300, 300]
    assert len(seen[0]) == len(seen[1]) == 256 and not set(seen[0]) & set(seen[1])


@pytest.mark.parametrize("backend", ["device", "ffcv", "dali"])
def test_ranks_without_drop_last_see_every_image(backend):
    """data.drop_last=false under ranks: the epoch is padded by its own first images (as DistributedSampler's
    default), so every image comes at least once and each rank takes as many; with drop_last the remainder of
    101 / 2 is dropped (and the partial batches). Without drop_last one image of 101 was dropped all the same."""
    need(backend)
    split = indexed_split(101, 3)
    for drop_last, per_rank, loaded, covered in [(False, 51, 51, 101), (True, 50, 48, 96)]:
        ranks = [make_loaders(backend, split, batch_size=16, drop_last=drop_last, rank=r, world_size=2)[0]
                 for r in (0, 1)]  # fmt: skip
        seen = [np.concatenate([y.numpy() for _, y in loader]) for loader in ranks]
        assert [r.num_images for r in ranks] == [per_rank] * 2 and [len(y) for y in seen] == [loaded] * 2
        assert len(set(seen[0]) | set(seen[1])) == covered


def test_ranks_draw_their_own_crops_and_flips():
    """Under DDP each rank's images take the augmentation drawn for their place in the epoch's permutation: drawn
    per shard from one generator state, every rank's j-th image had the same crop and flip (a global batch held
    only one rank's worth of distinct augmentations). One process keeps its draws (runs stay reproducible)."""
    split = indexed_split(600, 2)
    whole = make_loaders("device", split)[0]
    gen = epoch_generator(whole.seed, whole.epoch)
    torch.randperm(whole.num_total, generator=gen)  # the plan draws its permutation first
    drawn = draw_augmentation(gen, whole.num_total)
    plans = [make_loaders("device", split, rank=r, world_size=2)[0].plan() for r in (0, 1)]
    for plan, mine in [(whole.plan(), slice(None)), *((p, shard(whole.num_total, r, 2)) for r, p in enumerate(plans))]:
        for got, want in zip((plan.dy, plan.dx, plan.flip), drawn, strict=True):
            assert np.array_equal(got, want[mine][: len(plan.order)].numpy())
    assert not np.array_equal(plans[0].flip, plans[1].flip)


@pytest.mark.parametrize("drop_last", [True, False])
def test_the_ranks_step_batches_together_are_one_process_s_batch(drop_last):
    """N ranks at batch b take, step by step, what one process at batch N * b takes (the same images, crops and
    flips; in a rank-interleaved order), and drop what it drops: each rank took a contiguous block of the epoch's
    permutation, so their step-k batches were another grouping of the images than one process's (helper-147).
    Without drop_last the padded places come last, so only the last step differs."""
    split = indexed_split(203, 2)  # 203 = 2 ranks x 101: 6 steps of 2 x 16 (the partial seventh dropped or not)
    whole = make_loaders("device", split, batch_size=32, drop_last=drop_last)[0].plan()
    plans = [make_loaders("device", split, batch_size=16, rank=r, world_size=2, drop_last=drop_last)[0].plan()
             for r in (0, 1)]  # fmt: skip
    full = 6 * 32
    for k in range(6):
        together = np.concatenate([p.order[16 * k : 16 * (k + 1)] for p in plans])
        mine = [np.stack([p.order, p.dy, p.dx, p.flip])[:, 16 * k : 16 * (k + 1)] for p in plans]
        want = np.stack([whole.order, whole.dy, whole.dx, whole.flip])[:, 32 * k : 32 * (k + 1)]
        assert sorted(together) == sorted(want[0]), k
        got = np.concatenate(mine, axis=1)
        assert sorted(map(tuple, got.T)) == sorted(map(tuple, want.T)), k  # each image with its own crop and flip
    if drop_last:
        assert sum(len(p.order) for p in plans) == len(whole.order) == full
    else:  # every image, the first one padded in once
        assert sorted(set(np.concatenate([p.order for p in plans]))) == list(range(203))


@pytest.mark.parametrize("augment", [True, False])
@pytest.mark.parametrize("backend", ["ffcv", "dali"])
def test_same_batches_as_device_loader(backend, augment):
    """Both backends follow DeviceLoader's (seed, epoch) plan: the batches are bit-identical."""
    options = dict(seed=3, augment=augment, channels_last=augment)  # both memory formats, on the way
    got, want = make_loaders(backend, **options), make_loaders("device", **options)
    assert next(iter(got[0]))[0].is_contiguous() != augment
    for epoch in (1, 2):
        got[0].set_epoch(epoch), want[0].set_epoch(epoch)
        for ours, theirs in zip(got, want, strict=True):
            pairs = list(zip(ours, theirs, strict=True))
            assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in pairs)


@pytest.mark.parametrize("backend", ["ffcv", "dali"])
def test_epoch_left_early_then_full_epoch(backend):
    """An epoch left after 0, 1 or all but one batch (a run in flight is collected) leaves the loader clean: the
    same epoch again, and the next one, give DeviceLoader's batches bit for bit."""
    train_loader, _ = make_loaders(backend)
    reference, _ = make_loaders("device")
    for leave_after in (0, 1, len(train_loader) - 1):
        for epoch in (1, 2):
            train_loader.set_epoch(epoch), reference.set_epoch(epoch)
            it = iter(train_loader)
            for _ in range(leave_after + 1):
                next(it)
            del it  # the generator closes: its finally collects the run in flight
            pairs = list(zip(train_loader, reference, strict=True))
            assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in pairs), (leave_after, epoch)


@pytest.mark.parametrize("backend", ["ffcv", "dali"])
def test_batches_held_while_the_epoch_goes_on_keep_their_pixels(backend):
    """The trainer keeps its first batches while later ones arrive (train.py's head): each batch is its own memory,
    not a buffer the backend's next batch overwrites."""
    train_loader, _ = make_loaders(backend)
    reference, _ = make_loaders("device")
    it = iter(train_loader)
    head = list(itertools.islice(it, 3))
    rest = list(it)
    for a, b in zip(head + rest, reference, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_an_old_dali_or_a_pipeline_that_does_not_build_is_one_line(monkeypatch):
    """An older DALI left in place (the installer keeps any that imports) lacks the executor the loader relies on; a
    pipeline DALI cannot build (on a GPU: a wheel for another CUDA) ends in one line, not DALI's traceback."""
    need("dali")
    import nvidia.dali

    from engine.data import dali_backend

    monkeypatch.setattr(nvidia.dali, "__version__", "1.30.0")
    with pytest.raises(DataError, match="DALI 1.30.0 is older than this loader needs"):
        dali_backend.build_pipeline(BATCH, CPU, augment=True, num_threads=1, seed=0)
    monkeypatch.undo()

    class Unbuildable:
        def build(self):
            raise RuntimeError("CUDA driver version is insufficient for CUDA runtime version\nat line 1")

    monkeypatch.setattr(dali_backend, "build_pipeline", lambda *args: Unbuildable())
    with pytest.raises(DataError) as err:
        dali_backend.make_loader(TRAIN, BATCH, train=True, device=CPU)
    message = str(err.value)
    assert "CUDA driver version is insufficient" in message and "data.backend=device" in message
    assert "\n" not in message and "nvidia-smi" not in message  # on a CPU the CUDA hint does not apply


def test_dali_schedules_the_next_batch_before_handing_out_this_one(monkeypatch):
    """DALI's calls, in order: batch b+1 is fed and scheduled before batch b is handed out (DALI works on it while
    the trainer steps), at most one run is in flight, each output is shared in a stream's order (None on a CPU:
    the host's) and released after its copy, and nothing is left in flight after an epoch, whole or left early.
    The pipeline runs the dynamic executor, whose outputs can follow a CUDA stream."""
    need("dali")
    train_loader, _ = make_loaders("dali")
    assert train_loader.pipe.exec_dynamic
    calls = []
    pipe = train_loader.pipe

    class Spy:
        def __getattr__(self, name):
            attr = getattr(pipe, name)
            if name not in ("schedule_run", "share_outputs", "release_outputs"):
                return attr

            def logged(*args):
                calls.append((name, *args))
                return attr(*args)

            return logged

    monkeypatch.setattr(train_loader, "pipe", Spy())
    import nvidia.dali.plugin.pytorch as dali_torch

    copy = dali_torch.feed_ndarray

    def logged_copy(*args, **kwargs):
        calls.append(("copy",))
        return copy(*args, **kwargs)

    monkeypatch.setattr(dali_torch, "feed_ndarray", logged_copy)
    n = len(train_loader)
    for b, _ in enumerate(train_loader):
        scheduled = sum(c[0] == "schedule_run" for c in calls)
        shared = [c for c in calls if c[0] == "share_outputs"]
        assert scheduled == min(b + 2, n) and len(shared) == b + 1, (b, calls)  # the next one already runs
        assert shared[-1] == ("share_outputs", None)  # a stream's order; on a CPU None (there is no stream)
        assert calls[-1][0] != "share_outputs"  # released (after the copy) before the batch is handed out
    names = [c[0] for c in calls]
    assert names.count("schedule_run") == names.count("share_outputs") == names.count("release_outputs") == n
    assert [m for m in names if m != "schedule_run"] == ["share_outputs", "copy", "release_outputs"] * n
    in_flight = 0
    for name in names:
        in_flight += {"schedule_run": 1, "share_outputs": -1}.get(name, 0)
        assert 0 <= in_flight <= 1
    calls.clear()
    next(iter(train_loader))  # left after one batch: the generator's close collects the next run
    names = [c[0] for c in calls]
    assert names.count("schedule_run") == names.count("share_outputs") == names.count("release_outputs") == 2


@pytest.mark.parametrize("backend", ["ffcv", "dali"])
def test_through_build_loaders(backend):
    need(backend)
    cfg = DataConfig(dataset="synthetic", backend=backend, synthetic_size=256)
    splits = load_splits(cfg, 0)
    ours = build_loaders(cfg, *splits, 64, 100, CPU, 0)
    theirs = build_loaders(DataConfig(dataset="synthetic", synthetic_size=256), *splits, 64, 100, CPU, 0)
    for a, b in zip(ours, theirs, strict=True):
        assert len(a) == len(b)
        assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b, strict=True))


@pytest.mark.parametrize("backend", ["ffcv", "dali"])
def test_missing_package_is_one_line_data_error(backend, monkeypatch):
    monkeypatch.setitem(data_backends.MODULES, backend, "arat_no_such_module")
    cfg = DataConfig(dataset="synthetic", backend=backend)
    with pytest.raises(DataError, match="install_data_backends.sh") as err:
        data_backends.build(cfg, TRAIN, TEST, BATCH, 100, CPU, SEED, True, 0, 1)
    assert "\n" not in str(err.value) and isinstance(err.value, ValueError)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU paths run for real on a GPU machine")
def test_gpu_pipelines_construct_without_a_gpu():
    """Only that the CUDA branches build their graphs: FFCV's without its ToDevice (each batch is pinned by torch and
    copied instead), GPU operators in DALI (not run here)."""
    if not (data_backends.available("ffcv") or data_backends.available("dali")):
        pytest.skip("neither FFCV nor DALI is installed (bash scripts/install_data_backends.sh)")
    cuda = torch.device("cuda", 0)
    if data_backends.available("ffcv"):
        from engine.data import ffcv_backend

        loader = ffcv_backend.make_loader(TEST, 100, train=True, device=cuda)
        ops = [type(op).__name__ for op in loader.ffcv.pipeline_specs["image"].transforms]
        assert ops == ["CropFlip", "ToTensor"] and loader.pin
    if data_backends.available("dali"):
        from engine.data import dali_backend

        pipe = dali_backend.build_pipeline(64, cuda, augment=True, num_threads=1, seed=0)
        outputs = getattr(pipe, "_graph_out", None)  # private: checked where this DALI version has it
        assert pipe.device_id == 0 and (outputs is None or [node.device for node in outputs] == ["gpu"])
        assert pipe.exec_dynamic  # its outputs can be shared in a CUDA stream's order


CUDA_PARAM = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))


# (backend, device): the CPU DeviceLoader is the oracle, so it is not a case
ON_DEVICE = [(b, "cpu") for b in BACKENDS if b != "device"] + [
    pytest.param(b, "cuda", marks=CUDA_PARAM.marks) for b in BACKENDS
]


@pytest.mark.parametrize(("backend", "device"), ON_DEVICE)
def test_batches_on_the_device_equal_the_cpu_device_loaders(backend, device):
    """On the device (a GPU in the GPU check's probes) every backend's batches, float32 in [0, 1] and channels-last,
    equal the CPU DeviceLoader's bit for bit: training with its last partial batch kept, two ranks' shards, and the
    test split's short batch."""
    need(backend)
    dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else CPU
    cfg = dict(seed=5, channels_last=True)
    for rank, world_size, drop_last in ((0, 1, False), (1, 2, True)):
        shard = dict(rank=rank, world_size=world_size, drop_last=drop_last)
        if backend == "device":
            train = DeviceLoader(TRAIN, BATCH, dev, train=True, **shard, **cfg)
            got = train, DeviceLoader(TEST, 100, dev, train=False, **cfg)
        else:
            data = DataConfig(dataset="synthetic", backend=backend, drop_last=drop_last)
            got = data_backends.build(data, TRAIN, TEST, BATCH, 100, dev, 5, True, rank, world_size)
        want = make_loaders("device", **shard, **cfg)
        for epoch in (1, 2):
            got[0].set_epoch(epoch), want[0].set_epoch(epoch)
            for ours, theirs in zip(got, want, strict=True):
                pairs = list(zip(ours, theirs, strict=True))
                assert len(pairs) == len(theirs) > 0
                for (x, y), (x_cpu, y_cpu) in pairs:
                    assert x.device == dev and y.device == dev and x.dtype == torch.float32 and y.dtype == torch.int64
                    assert x.is_contiguous(memory_format=torch.channels_last)
                    assert torch.equal(x.cpu(), x_cpu) and torch.equal(y.cpu(), y_cpu)


def test_ffcv_pipelines_make_no_cuda_streams(monkeypatch):
    """FFCV's loader thread makes a CUDA stream per batch slot wherever CUDA exists; made on that thread (current
    device 0) they open a context on GPU 0 in every torchrun rank. These pipelines have no GPU operation: once an
    FFCV loader exists, FFCV treats them as CPU ones."""
    need("ffcv")
    import ffcv.loader.epoch_iterator as epoch_iterator

    monkeypatch.setattr(epoch_iterator, "IS_CUDA", True)  # as FFCV sets it on a machine with CUDA
    loader, _ = make_loaders("ffcv", augment=False, channels_last=False)
    assert epoch_iterator.IS_CUDA is False
    labels = np.concatenate([y.numpy() for _, y in loader])  # and an epoch runs without them
    assert len(np.unique(labels)) == len(labels) == len(loader) * BATCH


def test_betons_are_cached_by_content(tmp_path):
    need("ffcv")
    from engine.data import ffcv_backend

    train_path, test_path = ffcv_backend.write_betons(TRAIN, TEST, tmp_path)
    mtime = train_path.stat().st_mtime_ns
    assert ffcv_backend.write_betons(TRAIN, TEST, tmp_path) == (train_path, test_path)
    assert train_path.stat().st_mtime_ns == mtime
    other = ArraySplit(TRAIN.images[:100], TRAIN.labels[:100])
    assert ffcv_backend.write_betons(other, TEST, tmp_path)[0] != train_path
    with pytest.raises(ValueError, match="uint8"):
        ffcv_backend.write_betons(ArraySplit(TRAIN.images.astype(np.float32), TRAIN.labels), TEST, tmp_path / "x")


def test_a_spoilt_beton_is_one_line_naming_it(tmp_path, monkeypatch):
    """A file at the beton's name that FFCV cannot read (cut short, foreign) or that holds another number of images
    is trusted by name alone: the loader says which file to delete, in one line, instead of FFCV's traceback; no
    temporary file is left beside a written beton."""
    need("ffcv")
    from engine.data import ffcv_backend

    monkeypatch.setenv("ARAT_CACHE_DIR", str(tmp_path))
    small = ArraySplit(TEST.images[:64], TEST.labels[:64])
    written = ffcv_backend.write_beton(small, tmp_path / "other.beton")
    names = sorted(p.name for p in tmp_path.iterdir())  # the temporary file renamed, nothing else but the lock
    assert names == [".other.beton.lock", "other.beton"]
    beton = ffcv_backend.cache_dir() / f"test-{ffcv_backend.split_digest(TEST)}.beton"
    beton.parent.mkdir(parents=True, exist_ok=True)
    whole = ffcv_backend.write_beton(TEST, tmp_path / "whole.beton").read_bytes()
    cut = whole[:-10]  # into its allocation table: its header and count read whole, it failed in FFCV's threads
    cases = ((written.read_bytes()[:300], "reading it"), (written.read_bytes(), "64 images"), (cut, "cut short"))
    for content, says in cases:
        beton.write_bytes(content)
        with pytest.raises(DataError) as err:
            ffcv_backend.make_loader(TEST, 100, train=False, device=CPU)
        message = str(err.value)
        assert str(beton) in message and "delete it" in message and says in message and "\n" not in message


def test_ranks_building_their_loaders_at_once_write_each_beton_once(tmp_path, monkeypatch):
    """torchrun's ranks build their FFCV loaders together: each wrote the same beton (N writers, N temporary
    copies). One writes, the others wait for it and find the file written."""
    need("ffcv")
    import threading
    import time

    from engine.data import ffcv_backend

    writes = []

    def writer(command, limit):  # the writer process, stood in: slow enough for the others to arrive meanwhile
        writes.append(command)
        time.sleep(0.5)
        Path(command[-2]).write_bytes(b"beton")
        return 0

    monkeypatch.setattr(ffcv_backend, "_run_writer", writer)
    small, path = ArraySplit(TEST.images[:64], TEST.labels[:64]), tmp_path / "small.beton"
    results = []  # each writer's result or its error, read back; daemon threads: a hung writer fails, not hangs

    def write() -> None:
        try:
            results.append(ffcv_backend.write_beton(small, path))
        except Exception as error:
            results.append(error)

    threads = [threading.Thread(target=write, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == [path] * 3 and len(writes) == 1 and path.read_bytes() == b"beton"
    # a folder that takes no file locks (NFS without lockd): written without one, as before the lock
    import errno

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    import fcntl
    from types import SimpleNamespace

    import engine.locks

    unlockable = SimpleNamespace(flock=no_locks, LOCK_EX=fcntl.LOCK_EX, LOCK_NB=fcntl.LOCK_NB)
    monkeypatch.setattr(engine.locks, "fcntl", unlockable)  # (this module's; fcntl itself untouched)
    ffcv_backend.write_beton(small, tmp_path / "unlocked.beton")
    assert len(writes) == 2 and (tmp_path / "unlocked.beton").read_bytes() == b"beton"


def test_the_beton_lock_holds_where_an_exclusive_flock_needs_a_writable_file(tmp_path, monkeypatch):
    """NFS takes an exclusive flock only on a file opened for writing (EBADF on one opened for reading). The beton
    writer's lock file was opened read-only, so there the lock was silently off and every rank wrote its own copy.
    With NFS's rule stood in, a second taker now waits while the writer holds it; another user's lock file, which
    this process may not write, is still opened (read-only: a local disk locks it so)."""
    import errno
    import fcntl
    from types import SimpleNamespace

    import engine.locks
    from engine.data import ffcv_backend

    def nfs_flock(fd, operation):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, "Bad file descriptor")
        fcntl.flock(fd, operation)

    nfs = SimpleNamespace(flock=nfs_flock, LOCK_EX=fcntl.LOCK_EX, LOCK_NB=fcntl.LOCK_NB)
    monkeypatch.setattr(engine.locks, "fcntl", nfs)  # (this module's; fcntl itself untouched)
    path = tmp_path / "x.beton"
    with ffcv_backend._writer_lock(path, 60):
        other = os.open(tmp_path / ".x.beton.lock", os.O_RDWR)
        try:
            assert engine.locks.flock_within(other, 0.3, poll_s=0.1) is False  # held by the writer
        finally:
            os.close(other)

    opened = []

    def not_ours(file, flags, *mode):  # as for another user's 0644 file (root may write any: stood in)
        opened.append(flags & os.O_ACCMODE)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(file, flags, *mode)

    real_open = os.open
    monkeypatch.setattr(os, "open", not_ours)
    fd = engine.locks.open_for_locking(tmp_path / ".x.beton.lock")
    monkeypatch.setattr(os, "open", real_open)
    os.close(fd)
    assert opened == [os.O_RDWR, os.O_RDONLY]


def _running(pid: int) -> bool:
    """Whether process `pid` still runs (a killed one may linger as a zombie its new parent never reaps)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def test_a_stuck_or_failing_beton_writer_is_one_line_not_a_hang(tmp_path, monkeypatch):
    """FFCV's writer polls its workers' progress forever when one is stuck or dead (a CI run hung 900 s in it): it
    runs in a fresh interpreter with a time limit, is run once more when stuck, and then, like a failing one, ends
    in one line. The processes it started (FFCV's workers) are killed with it, its partial file is removed, and so
    are the temporary files of a write killed long ago; nothing else is touched."""
    need("ffcv")
    from engine.data import ffcv_backend

    small = ArraySplit(TEST.images[:8], TEST.labels[:8])
    runs, pids = tmp_path / "runs.txt", tmp_path / "pids.txt"
    stuck = (  # a writer that starts a worker, writes part of its file, then hangs
        f"import subprocess, sys, time; open({str(runs)!r}, 'a').write('x'); "
        "w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pids)!r}, 'a').write(f'{{w.pid}} '); open(sys.argv[2], 'wb').write(b'partial'); time.sleep(60)"
    )
    old, recent = tmp_path / "stuck.beton.tmp1-dead", tmp_path / "stuck.beton.arrays2-live.npz"
    for leftover in (old, recent):
        leftover.write_bytes(b"left by a killed write")
    os.utime(old, (time.time() - 86400, time.time() - 86400))
    monkeypatch.setattr(ffcv_backend, "write_seconds", lambda n: 6.0)  # two interpreter start-ups on a busy CPU
    monkeypatch.setattr(ffcv_backend, "_WRITER", stuck)
    with pytest.raises(DataError, match="did not finish stuck.beton in 6 s, twice"):
        ffcv_backend.write_beton(small, tmp_path / "stuck.beton")
    assert runs.read_text() == "xx"  # run once more before giving up
    workers = [int(pid) for pid in pids.read_text().split()]
    assert len(workers) == 2
    deadline = time.monotonic() + 10
    while any(map(_running, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(_running, workers)), "the stuck writer's worker outlived it"
    monkeypatch.setattr(ffcv_backend, "_WRITER", "raise SystemExit(3)")
    with pytest.raises(DataError, match=r"failed on bad.beton \(exit 3"):
        ffcv_backend.write_beton(small, tmp_path / "bad.beton")
    monkeypatch.setattr(ffcv_backend, "_WRITER", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    with pytest.raises(DataError, match=r"failed on killed.beton \(killed by signal 9\)"):
        ffcv_backend.write_beton(small, tmp_path / "killed.beton")
    left = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock"))  # the writers' locks stay
    assert left == ["pids.txt", "runs.txt", recent.name]


ORPHANING_PARENT = """
import sys
from engine.data import ffcv_backend
from engine.data.cifar import ArraySplit
import numpy as np

ffcv_backend.require = lambda name: None
ffcv_backend.write_seconds = lambda n: 120.0
ffcv_backend._WRITER = sys.argv[2]
images = np.zeros((8, 32, 32, 3), np.uint8)
ffcv_backend.write_beton(ArraySplit(images, np.zeros(8, np.int64)), __import__("pathlib").Path(sys.argv[1]))
"""


def test_a_writer_whose_parent_is_killed_outright_dies_with_its_workers(tmp_path):
    """The writer runs in a session of its own (to be killed as a group with FFCV's workers): a parent killed
    outright (SIGKILL, the OOM killer) runs no cleanup, and the writer and its workers, a stuck one included, kept
    running, holding the parent's output pipe. They now kill themselves once their parent is gone."""
    import signal
    import subprocess
    import sys

    pids = tmp_path / "pids.txt"
    stuck = (  # a writer that starts a worker, then hangs: records both pids
        "import os, subprocess, sys, time; "
        "w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{w.pid}}'); time.sleep(60)"
    )
    repo = str(Path(__file__).resolve().parents[2])
    parent = subprocess.Popen([sys.executable, "-c", ORPHANING_PARENT, str(tmp_path / "x.beton"), stuck],
                              env={**os.environ, "PYTHONPATH": repo})  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (pids.exists() and len(pids.read_text().split()) == 2) and time.monotonic() < deadline:
            time.sleep(0.1)
        writers = [int(pid) for pid in pids.read_text().split()]
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 10
    while any(map(_running, writers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = [pid for pid in writers if _running(pid)]
    for pid in alive:  # not left behind by a failing test
        os.kill(pid, signal.SIGKILL)
    assert not alive, "the writer or its worker outlived a parent killed outright"


def test_the_beton_writer_does_not_import_from_the_working_directory(tmp_path, monkeypatch):
    """`python -c` puts the working directory first on sys.path: a run started beside a folder named like one of
    the writer's imports (a cloned `ffcv/` source tree) must still write with the installed FFCV."""
    need("ffcv")
    from engine.data import ffcv_backend

    (tmp_path / "ffcv").mkdir()
    (tmp_path / "ffcv" / "__init__.py").write_text("raise SystemExit(7)")
    monkeypatch.chdir(tmp_path)
    small = ArraySplit(TEST.images[:8], TEST.labels[:8])
    assert ffcv_backend.write_beton(small, tmp_path / "out" / "small.beton").stat().st_size > 8 * 3072


@pytest.mark.data
@pytest.mark.parametrize("backend", ["ffcv", "dali"])
def test_real_cifar10_same_as_device_loader(backend, tmp_path):
    if find_layout("cifar10", DATA_DIR) is None:
        pytest.skip(f"no CIFAR-10 layout under ARAT_TEST_DATA={DATA_DIR}")
    need(backend)
    if backend == "ffcv":
        from engine.data import ffcv_backend

        betons = ffcv_backend.write_betons_from_layout("cifar10", DATA_DIR, tmp_path)
        assert [p.stat().st_size > n * 3072 for p, n in zip(betons, (50_000, 10_000), strict=True)] == [True, True]
        for path in betons:  # 228 MB: not worth keeping in pytest's temporary directories
            path.unlink()
    train, test = load_split("cifar10", DATA_DIR, True).head(2048), load_split("cifar10", DATA_DIR, False).head(500)
    got, want = make_loaders(backend, train, test, batch_size=256), make_loaders("device", train, test, batch_size=256)
    for ours, theirs in zip(got, want, strict=True):
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(ours, theirs, strict=True))


def metrics_rows(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def untimed(row: dict) -> dict:
    """A metrics row without its timings and its process-wide counts (captures, compiled graphs: dicts)."""
    return {k: v for k, v in row.items() if not k.endswith(("seconds", "_per_s")) and not isinstance(v, dict)}


def test_short_arat_run_same_metrics(tmp_path):
    """Same structure; and since the batches are bit-identical, the same numbers, exactly (a CPU trainer is
    deterministic: a resumed run equals an uninterrupted one bit for bit; the comparison took 1e-3 before)."""
    from engine.config import apply_overrides
    from engine.recipes import get_recipe
    from engine.train import run_training

    rows = {}
    for backend in BACKENDS:
        if backend != "device" and not data_backends.available(backend):
            continue
        cfg = apply_overrides(get_recipe("smoke"), [f"data.backend={backend}"])
        rows[backend] = metrics_rows(run_training(cfg, tmp_path / backend, evaluate_at_end=False))
    assert len(rows["device"]) == get_recipe("smoke").epochs, "the smoke run wrote no metrics"
    if len(rows) == 1:
        pytest.skip("neither FFCV nor DALI is installed: nothing to compare the device backend with")
    for backend, got in rows.items():
        assert [sorted(r) for r in got] == [sorted(r) for r in rows["device"]], f"{backend}: other metrics"
        for ours, theirs in zip(got, rows["device"], strict=True):
            assert untimed(ours) == untimed(theirs), f"{backend}: other numbers"  # exact: CPU training is


def test_backend_modules_do_not_import_each_other():
    """ffcv_backend and dali_backend share `engine.data.optional`, never `backends` (which imports them)."""
    import ast
    from pathlib import Path

    import engine.data as data_pkg

    root = Path(data_pkg.__file__).parent
    for name in ("ffcv_backend.py", "dali_backend.py", "optional.py"):
        tree = ast.parse((root / name).read_text())
        imported = set()  # every dotted part of every module and name imported, relative or absolute
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                imported |= set((node.module or "").split(".")) | {a.name for a in node.names}
            elif isinstance(node, ast.Import):
                imported |= {part for a in node.names for part in a.name.split(".")}
        assert not imported & {"backends", "ffcv_backend", "dali_backend"}, (name, imported)


def test_ffcv_leaves_torchs_thread_count_alone():
    """FFCV's loader thread sets its thread count at every epoch's start (`Compiler.set_num_threads`), which also set
    torch's, from that thread, behind the trainer's back: with the native kernels on, an AR-AT run after an FFCV
    loader had run in the process computed other numbers (tests/data: the short run's metrics). Once an FFCV loader
    exists, FFCV's call sets numba's count only."""
    need("ffcv")
    make_loaders("ffcv", augment=False, channels_last=False)
    import numba
    from ffcv.pipeline.compiler import Compiler

    before = torch.get_num_threads()
    other = 1 if before > 1 else min(2, numba.config.NUMBA_NUM_THREADS)
    if other == before:
        pytest.skip("one core: no other thread count to set")
    try:
        Compiler.set_num_threads(other)
        assert torch.get_num_threads() == before and Compiler.num_threads == other
    finally:
        torch.set_num_threads(before)


def test_each_ffcv_batch_is_copied_out_of_ffcv_s_slots_into_fresh_pinned_memory(monkeypatch):
    """With CUDA present FFCV allocates its slots pinned, and pin_memory() of a pinned tensor is the tensor itself:
    the non-blocking device copy read FFCV's slot, which its worker rewrites one batch later when its queue is full
    (a review found it; the GPU path has not run on a GPU). pinned_copy always makes a fresh pinned block. On a CPU
    the allocation is stubbed (there is no pinned allocator without CUDA); on a GPU it runs for real."""
    from engine.data.ffcv_backend import pinned_copy

    src = torch.arange(12, dtype=torch.uint8).reshape(3, 4)
    if torch.cuda.is_available():
        src = src.pin_memory()
        out = pinned_copy(src)
        assert out.is_pinned() and out.data_ptr() != src.data_ptr() and torch.equal(out, src)
        return
    asked = []
    empty = torch.empty

    def unpinned_empty(*shape, pin_memory=False, **kwargs):
        asked.append(pin_memory)
        return empty(*shape, **kwargs)

    monkeypatch.setattr(torch, "empty", unpinned_empty)
    out = pinned_copy(src)
    assert asked == [True] and out.data_ptr() != src.data_ptr() and torch.equal(out, src) and out.dtype == src.dtype
