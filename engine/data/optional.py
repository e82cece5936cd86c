"""The optional packages of the data backends: import one, or say in one line how to install it.

Both backend modules and `backends` depend on this module; it depends on none of them.
"""

from __future__ import annotations

import importlib

import torch

from .cifar import DataError

INSTALL = {
    "ffcv": (
        "FFCV is not installed: run `bash scripts/install_data_backends.sh ffcv` (apt-get install libopencv-dev "
        "libturbojpeg0-dev pkg-config g++; pip install -c constraints/cpu.txt numba opencv-python-headless "
        "'pillow>=9' terminaltables fastargs assertpy psutil tqdm; pip install --no-deps ffcv==1.0.2)"
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
