import tarfile

import numpy as np
import pytest
import torch
from hostile import RunsCode

from engine.config import DataConfig
from engine.data import DataError, DeviceLoader, load_split, load_splits
from engine.data.synthetic import synthetic_split


def indexed_split(n=64):
    """Images whose pixels encode their index, so every output can be traced to its source."""
    images = np.zeros((n, 32, 32, 3), dtype=np.uint8)
    rng = np.random.default_rng(0)
    for i in range(n):
        images[i] = rng.integers(1, 256, (32, 32, 3))  # no zeros: the padding is recognisable
    return synthetic_split(n, 10, 0).__class__(images, np.arange(n) % 10)


def candidates(image):
    padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
    for dy in range(9):
        for dx in range(9):
            crop = padded[dy : dy + 32, dx : dx + 32]
            yield (dy - 4, dx - 4, False), crop
            yield (dy - 4, dx - 4, True), crop[:, ::-1]


def test_device_loader_semantics():
    split = indexed_split()
    loader = DeviceLoader(split, 16, torch.device("cpu"), train=True, seed=3)
    loader.set_epoch(1)
    seen, shifts = [], []
    source = {split.images[i].tobytes(): i for i in range(len(split))}
    for x, y in loader:
        assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.is_contiguous(memory_format=torch.channels_last) and x.min() >= 0 and x.max() <= 1
        hwc = (x.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
        for img, label in zip(hwc, y.numpy(), strict=True):
            # find the source: the one whose some crop/flip equals the output
            match = [
                (i, aug) for i in range(len(split)) for aug, c in candidates(split.images[i]) if np.array_equal(c, img)
            ]
            assert len(match) == 1, "output is no allowed crop/flip of any source image, or of several"
            i, aug = match[0]
            assert split.labels[i] == label
            seen.append(i)
            shifts.append(aug)
    assert len(source) == len(split)  # distinct source images: each output traces to one
    assert sorted(seen) == list(range(len(split)))  # every image exactly once
    flipped = sum(aug[2] for aug in shifts)  # 64 draws of p = 1/2 and of 81 shifts (expected ~44 distinct)
    assert 16 <= flipped <= 48 and len({aug[:2] for aug in shifts}) >= 20, "augmentation is missing or stuck"
    loader.set_epoch(2)
    order2 = [tuple(y.tolist()) for _, y in loader]
    loader.set_epoch(1)
    assert [tuple(y.tolist()) for _, y in loader] != order2


def test_device_loader_is_deterministic_and_shards():
    split = synthetic_split(100, 10, 0)
    a = DeviceLoader(split, 10, torch.device("cpu"), train=True, seed=1)
    b = DeviceLoader(split, 10, torch.device("cpu"), train=True, seed=1)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # labels = image indices, so the ranks' shares can be traced: disjoint halves covering the split, each rank's
    # order fixed by the seed and different from one epoch to the next
    split.labels[:] = np.arange(100)

    def shares(epoch, seed=1):
        ranks = [DeviceLoader(split, 10, "cpu", train=True, seed=seed, rank=r, world_size=2) for r in (0, 1)]
        for r in ranks:
            r.set_epoch(epoch)
        assert [len(r) for r in ranks] == [5, 5]
        return [torch.cat([y for _, y in r]).tolist() for r in ranks]

    first, second = shares(1)
    assert len(first) == len(second) == 50 and not set(first) & set(second)
    assert sorted(first + second) == list(range(100))
    assert shares(1) == [first, second] and shares(2) != [first, second] and shares(1, seed=2) != [first, second]


def test_augmentation_statistics():
    """The draws DeviceLoader augments with (its outputs are traced to them in test_device_loader_semantics)."""
    from engine.data.loader import draw_augmentation, epoch_generator

    dy, dx, flip = draw_augmentation(epoch_generator(0, 1), 50000)
    expected = 50000 / 9
    for shift in (dy, dx):
        counts = np.bincount(shift.numpy(), minlength=9)
        assert len(counts) == 9 and ((counts - expected) ** 2 / expected).sum() < 30  # 8 degrees of freedom: p ~ 2e-4
    assert abs(flip.float().mean().item() - 0.5) < 0.01


def test_test_loader_in_order_with_partial_batch():
    split = synthetic_split(25, 10, 0)
    loader = DeviceLoader(split, 10, torch.device("cpu"), train=False)
    xs, ys = zip(*loader, strict=True)
    assert [len(y) for y in ys] == [10, 10, 5]
    x = torch.cat(xs)
    expected = torch.from_numpy(split.images).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(x, expected) and torch.equal(torch.cat(ys), torch.from_numpy(split.labels))


def test_missing_and_corrupt_data(tmp_path):
    with pytest.raises(DataError, match="arat data download"):
        load_split("cifar10", tmp_path, train=True)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (root / name).write_bytes(b"garbage")
    with pytest.raises(DataError, match="corrupt"):
        load_split("cifar10", tmp_path, train=False)


def test_synthetic_fallback_only_when_allowed(tmp_path):
    cfg = DataConfig(dataset="cifar10", data_dir=str(tmp_path), synthetic_fallback=True, synthetic_size=100)
    train, test = load_splits(cfg, 0)
    assert len(train) == 100
    with pytest.raises(DataError):
        load_splits(DataConfig(dataset="cifar10", data_dir=str(tmp_path)), 0)


def test_data_prepared_between_the_two_splits_reads_does_not_mix_them(tmp_path, monkeypatch):
    """The fallback was resolved for each split: CIFAR-10 prepared (or downloaded) between the training and the
    test reads gave synthetic training with real test images, recorded as cifar10. Now both come from one reading."""
    import engine.data

    find_layout, reads = engine.data.find_layout, []

    def ready_after_the_first_look(dataset, data_dir):  # the real folder appears once the training split is read
        reads.append(dataset)
        return tmp_path if len(reads) > 1 else find_layout(dataset, data_dir)

    monkeypatch.setattr(engine.data, "find_layout", ready_after_the_first_look)
    cfg = DataConfig(dataset="cifar10", data_dir=str(tmp_path), synthetic_fallback=True, synthetic_size=100)
    train, test = load_splits(cfg, 0)  # (the real files are absent: a second look would fail to read them)
    assert len(train) == 100 and len(test) == 64 and reads == ["cifar10"]


@pytest.mark.data
def test_real_cifar10_layout(cifar_dir):
    train, test = load_split("cifar10", cifar_dir, True), load_split("cifar10", cifar_dir, False)
    assert train.images.shape == (50000, 32, 32, 3) and test.images.shape == (10000, 32, 32, 3)
    assert np.bincount(train.labels).tolist() == [5000] * 10 and np.bincount(test.labels).tolist() == [1000] * 10
    assert np.allclose(test.images.reshape(-1, 3).mean(0) / 255, [0.4942, 0.4851, 0.4504], atol=2e-3)


def _fake_cifar10(tmp_path, test_batch) -> None:
    import pickle

    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (root / name).write_bytes(pickle.dumps(test_batch))


def test_a_crafted_dataset_file_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    _fake_cifar10(tmp_path, {b"data": RunsCode(marker), b"labels": [0]})
    with pytest.raises(DataError, match="not an official CIFAR file"):
        load_split("cifar10", tmp_path, train=False)
    assert not marker.exists()


def test_official_pickles_of_numpy_arrays_still_load(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, (4, 3072), dtype=np.uint8)
    _fake_cifar10(tmp_path, {b"data": data, b"labels": [0, 1, 2, 3], b"batch_label": b"testing batch 1 of 1"})
    split = load_split("cifar10", tmp_path, train=False)
    assert split.images.shape == (4, 32, 32, 3) and list(split.labels) == [0, 1, 2, 3]
    # the official rows hold the R, G and B planes one after the other: HWC is that reshaped and transposed
    assert np.array_equal(split.images, data.reshape(4, 3, 32, 32).transpose(0, 2, 3, 1))


def test_pixels_out_of_range_are_refused_not_wrapped(tmp_path):
    data = np.full((2, 3072), 300, dtype=np.int64)
    _fake_cifar10(tmp_path, {b"data": data, b"labels": [0, 1]})
    with pytest.raises(DataError, match="outside 0..255"):
        load_split("cifar10", tmp_path, train=False)


def test_pixels_become_their_quotient_by_255_by_a_table_the_same_on_every_device():
    """uint8 -> float u / 255 by a lookup of the CPU's quotients: on CUDA, dividing by the host scalar 255 computes
    u * fl(1/255), one bit off for about half the values (so a CUDA batch would not equal the CPU loader's)."""
    from engine.data import to_unit_interval

    u = torch.arange(256, dtype=torch.uint8)
    unit = to_unit_interval(u)
    assert unit.dtype == torch.float32 and torch.equal(unit, u.float().div(255))  # the CPU's quotients, bit for bit
    assert torch.equal(unit, u.double().div(255).float())  # correctly rounded
    reciprocal = u.float() * torch.tensor(1.0, dtype=torch.float32).div(255)  # what CUDA computes for `x / 255`
    assert (reciprocal != unit).sum() > 100
    hwc = torch.randint(0, 256, (2, 4, 4, 3), dtype=torch.uint8)
    nchw = to_unit_interval(hwc).permute(0, 3, 1, 2)  # as the loaders' finish: channels-last strides kept
    assert nchw.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(nchw, hwc.permute(0, 3, 1, 2).float() / 255)


def test_an_archive_extracts_without_setuid_or_group_write_bits_and_without_a_deprecation_warning(tmp_path):
    """safe_extract uses tarfile's "data" filter where Python has it (Python 3.14 makes it the default, and 3.12-3.13
    warned without it): a member's setuid and group/other write bits are dropped."""
    import io
    import tarfile
    import warnings

    from engine.data.download import safe_extract

    archive = tmp_path / "a.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        member = tarfile.TarInfo("cifar-10-batches-py/readme.html")
        member.size, member.mode = 2, 0o4777
        tar.addfile(member, io.BytesIO(b"hi"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        safe_extract(archive, tmp_path / "out")
    extracted = tmp_path / "out" / "cifar-10-batches-py" / "readme.html"
    assert extracted.read_bytes() == b"hi"
    if hasattr(tarfile, "data_filter"):
        assert extracted.stat().st_mode & 0o7777 == 0o755


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE, tarfile.CHRTYPE])
def test_an_archive_member_that_is_not_a_file_or_a_folder_is_refused_by_name(tmp_path, kind):
    """Links, FIFOs and device files are refused by name before anything is extracted (a FIFO or a device reached
    the data filter, whose SpecialFileError was then reported as "not a gzip tar archive", helper-134)."""
    from engine.data.download import safe_extract

    archive = tmp_path / "a.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        member = tarfile.TarInfo("cifar-10-batches-py/odd")
        member.type, member.linkname = kind, "cifar-10-batches-py/other"
        tar.addfile(member)
    with pytest.raises(DataError, match="unsafe member 'cifar-10-batches-py/odd'"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))
