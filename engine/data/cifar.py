"""Readers for the official python layouts of CIFAR-10 (`cifar-10-batches-py`) and CIFAR-100 (`cifar-100-python`)."""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError, shell_word

LAYOUTS = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels"),
}


class DataError(UserError):
    """Missing or corrupt dataset; the message says where to get it."""


@dataclass
class ArraySplit:
    images: np.ndarray  # (N, 32, 32, 3) uint8, HWC
    labels: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int) -> ArraySplit:
        return self if n <= 0 or n >= len(self) else ArraySplit(self.images[:n], self.labels[:n])

    def fingerprint(self) -> str:
        """A hash of the images and labels (~0.3 s for CIFAR's 50,000): which data a run trained on, where a
        dataset's name and folder do not say (another copy under the same name, a relative data_dir read from
        another working directory)."""
        digest = hashlib.sha256()
        for a in (self.images, self.labels):
            digest.update(f"{a.shape} {a.dtype}".encode())
            digest.update(np.ascontiguousarray(a))  # (its buffer: no copy)
        return digest.hexdigest()[:16]


def how_to_get(dataset: str, data_dir: Path) -> str:
    folder = LAYOUTS[dataset][0]
    if data_dir.exists() and not data_dir.is_dir():
        return f"{data_dir} is a file: point --data-dir / ARAT_DATA_DIR at the directory that holds {folder}/"
    return (
        f"expected the official layout {data_dir / folder}/; get it with `arat data download --dataset {dataset} "
        f"--data-dir {shell_word(data_dir)}`, or set --data-dir / ARAT_DATA_DIR to where it is"
    )


def find_layout(dataset: str, data_dir: str | Path) -> Path | None:
    """The dataset folder if every official file is present, else None."""
    folder, train, test, _ = LAYOUTS[dataset]
    root = Path(data_dir) / folder
    return root if all((root / name).is_file() for name in train + test) else None


# What the official batches (and their numpy re-pickles) reference: numpy's array reconstruction, nothing else.
ALLOWED_GLOBALS = {
    (module, name)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
} | {("numpy", "ndarray"), ("numpy", "dtype")}


class _DatasetUnpickler(pickle.Unpickler):
    """The official format is a pickle: read it without letting a crafted file call anything but numpy's own
    array reconstruction (plain dicts, lists, bytes, str and ints need no global)."""

    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refused {module}.{name}: not part of the official CIFAR format")
        return super().find_class(module, name)


def _read_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _DatasetUnpickler(f, encoding="bytes").load()
        data = np.asarray(batch[b"data"])
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except pickle.UnpicklingError as e:
        raise DataError(
            f"{path} is not an official CIFAR file ({e}); delete it and download the dataset again"
        ) from None
    except (OSError, EOFError, KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise DataError(f"{path} is corrupt ({type(e).__name__}); delete it and download the dataset again") from None
    in_range = data.size == 0 or (np.issubdtype(data.dtype, np.integer) and data.min() >= 0 and data.max() <= 255)
    if data.dtype != np.uint8 and not in_range:
        raise DataError(f"{path} holds pixel values outside 0..255 ({data.dtype}); download the dataset again")
    data = data.astype(np.uint8, copy=False)
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise DataError(f"{path} has data of shape {data.shape}, expected (N, 3072); download the dataset again")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # official: R, G, B planes -> HWC
    return np.ascontiguousarray(images), labels


def load_split(dataset: str, data_dir: str | Path, train: bool) -> ArraySplit:
    """One split of the official layout, in official order."""
    if dataset not in LAYOUTS:
        raise DataError(f"unknown dataset {dataset!r} (cifar10, cifar100)")
    root = find_layout(dataset, data_dir)
    if root is None:
        raise DataError(f"{dataset} not found: " + how_to_get(dataset, Path(data_dir)))
    _, train_files, test_files, label_key = LAYOUTS[dataset]
    parts = [_read_batch(root / name, label_key) for name in (train_files if train else test_files)]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    num_classes = 100 if dataset == "cifar100" else 10
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DataError(f"{root} has labels outside [0, {num_classes}); download the dataset again")
    return ArraySplit(images, labels)
