"""Shared fixtures. Real CIFAR-10 is looked up in $ARAT_TEST_DATA (CI prepares it), then ./data."""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

import pytest
import torch

from engine.data.cifar import find_layout

# Threads per test process: the cores, shared among pytest-xdist's workers when `-n N` splits the suite (two 2-thread
# processes on two cores slow each other down many times over); subprocesses a test starts inherit the share.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, min(2, (os.cpu_count() or 1) // WORKERS))
if WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(THREADS)
torch.set_num_threads(THREADS)
# Tests compare paths bit for bit or to float precision: on CUDA, pin what would otherwise vary (TF32 matmuls and
# convolutions, cuDNN's algorithm choice), so that they test the engine, not cuDNN. No effect on CPU.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
torch.backends.cudnn.deterministic = True
torch.backends.cudnn.benchmark = False


def real_data_dir() -> Path | None:
    for candidate in (os.environ.get("ARAT_TEST_DATA"), "data"):
        if candidate and find_layout("cifar10", candidate):
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    found = real_data_dir()
    if found is None:
        pytest.skip("real CIFAR-10 absent: run `python ../shared/data/cifar10/prepare.py data` or set ARAT_TEST_DATA")
    return found


@pytest.fixture
def tiny_cfg():
    """The smoke recipe: synthetic data, ResNet-18 width 8, seconds per run."""
    from engine.recipes import get_recipe

    cfg = get_recipe("smoke")
    cfg.perf.cudnn_benchmark = "off"  # deterministic cuDNN algorithms (see above)
    cfg.perf.compile = "off"  # auto compiles on CUDA (minutes per test in the GPU check's probes); tests may set it
    return cfg


@pytest.fixture(autouse=True)
def compile_settings_as_they_were():
    """engine.analysis.keep_saved_tensors (a compiled grad-sim run) changes process-wide compile settings; restored
    after each test, so that a later test in this worker compiles as a run without grad-sim does (caches on)."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    settings = [(functorch_config, "donated_buffer"), (functorch_config, "enable_autograd_cache"),
                (inductor_config, "fx_graph_cache"), (inductor_config, "force_disable_caches")]  # fmt: skip
    saved = [getattr(module, name) for module, name in settings]
    yield
    for (module, name), value in zip(settings, saved, strict=True):
        setattr(module, name, value)


def pytest_collection_finish(session):
    """Triton's interpreter mode is fixed by its first import. Imported here, after collection (where
    tests/kernels/conftest.py sets TRITON_INTERPRET=1), so that a test removing the variable for itself (the AOT
    reports) is never the first import: it left the whole worker compiled, and the Triton tests there skipped."""
    if importlib.util.find_spec("triton") is not None:  # optional (pip install arat[kernels])
        importlib.import_module("triton")


@pytest.fixture(autouse=True)
def pgd_step_as_it_was():
    """A run built with perf.kernels on installs the fused PGD step process-wide (engine.attacks.set_step_kernel):
    put back after each test, so that a later test's attacks take the step their own settings choose."""
    yield
    from engine.attacks import set_step_kernel

    set_step_kernel(None)


@pytest.fixture(autouse=True)
def engine_warnings_untagged():
    """A test that joins a (stubbed) process group tags the engine's warnings with its rank; untagged after each
    test, so a later one in this worker reads its messages exactly (helper-124: a stubbed init left `[rank 1] `)."""
    yield
    from engine.distributed import tag_engine_warnings

    tag_engine_warnings(None)
