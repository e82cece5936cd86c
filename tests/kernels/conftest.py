"""Fixtures for the kernel tests: one `backend` fixture runs a test on reference, native and Triton.

Why TRITON_INTERPRET is set here, and only sometimes: @triton.jit reads it when it decorates a function, i.e. when
triton itself is imported (its own helpers such as tl.rand and tl.sum are @triton.jit functions) and when
kernels.*.triton_impl is imported. Setting it later in the same process does nothing. So on a machine without a GPU:
- if triton is not imported yet when pytest loads this file (e.g. `pytest tests/kernels`), it is set here, and the
  Triton tests run in-process on CPU tensors under the interpreter;
- if something imported triton earlier in the session (engine tests collected first), the Triton tests skip here
  and test_interpreter.py re-runs exactly them (`-m triton`) in a fresh subprocess with TRITON_INTERPRET=1.
With a GPU the variable is left alone and the Triton tests run compiled on CUDA tensors. AOT compilation
(test_aot.py) always runs in a subprocess without the variable, since interpreted kernels cannot be compiled.
Setting it is harmless for other tests of the session: without a GPU nothing else can run Triton code.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kernels  # noqa: E402  (after the environment is settled)
from kernels import _dispatch  # noqa: E402

NATIVE_SKIP = "native library not built: cmake -S . -B build -DCMAKE_PREFIX_PATH=... (see docs/kernels.md)"


def pytest_configure(config):
    config.addinivalue_line("markers", "triton: runs a Triton kernel (compiled on CUDA, interpreted on CPU)")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: test_interpreter.py selects these with `-m triton`
def pytest_collection_modifyitems(items):
    """Mark the Triton-backend tests here rather than with pytest.mark.triton in the fixture's params: that is
    evaluated when this file is imported, before pytest_configure has registered the marker."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("backend") == "triton":
            item.add_marker("triton")


def triton_device() -> torch.device:
    """CUDA when present, else CPU under the interpreter; skips when neither can run Triton in this process."""
    importable, interpreted, detail = _dispatch.triton_status()
    if not importable:
        pytest.skip(detail)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not interpreted:
        pytest.skip("triton was imported without TRITON_INTERPRET=1; test_interpreter.py runs this in a subprocess")
    return torch.device("cpu")


@pytest.fixture
def triton_dev() -> torch.device:
    """The device Triton runs on in this process (see triton_device)."""
    return triton_device()


@pytest.fixture(params=["reference", "native", "triton"])
def backend(request):
    """(name, device) with every op forced onto that backend for the test's duration."""
    name = request.param
    device = torch.device("cpu")
    if name == "native" and not kernels.load_native():
        pytest.skip(NATIVE_SKIP)
    if name == "triton":
        device = triton_device()
    with kernels.force_backend(name):
        yield name, device
