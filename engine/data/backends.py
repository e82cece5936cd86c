"""Optional data backends (FFCV, NVIDIA DALI) behind the `Loader` interface, and what they share.

Every backend follows one plan per epoch, drawn exactly as `DeviceLoader` draws it: a permutation from
`epoch_generator(seed, epoch)`, sharded by rank, then per-image shifts and flips from the same generator. The
backends only differ in who moves and augments the pixels (a numba kernel inside FFCV's pipeline, DALI operators),
so for a given (seed, epoch, rank, world_size) every backend yields the same batches, bit for bit.
"""

from __future__ import annotations

import importlib

import torch

from ..config import DataConfig
from .cifar import ArraySplit, DataError
from .loader import Loader

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
