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


# The slowest tests (CI's --durations, 2026-12-07), started first: in collection (alphabetical) order the 113 s
# real-data run began near the end and one worker idled for a minute while it ran. With `--maxschedchunk 1`
# (scripts/test.sh) each worker takes tests a few at a time, so the slow ones spread over the workers.
SLOW_FIRST = [
    "test_distributed.py::test_compiled_ddp_epochs_have_no_recompiles_or_graph_breaks",
    "test_train.py::test_short_real_data_run_beats_chance",
    "test_gpu_check.py::test_cpu_smoke_runs_every_stage",
    "test_compile_cache.py::test_avx2_after_avx512_in_one_temp_dir_stays_finite",
    "test_perf.py::test_compiled_objectives_equal_eager",
    "test_evaluation_chunks.py::test_a_trained_runs_autoattack_record_is_read_back_from_disk",
    "test_perf.py::test_compiled_gemm_convolutions_equal_eager",
    "test_analysis.py::test_grad_sim_is_right_where_inductor_s_cache_holds_the_graph_compiled_without_it",
    "test_inductor_sm90.py::test_the_networks_compile_for_sm90_with_the_fused_dual_bn",
    "test_aot.py::test_every_kernel_compiles_for_sm75_sm80_and_sm90_without_spills",
    "test_perf.py::test_compile_equals_eager",
    "test_native_build.py::test_cmake_build_from_scratch",
    "test_perf.py::test_inductor_compiled_evaluation_forwards_equal_eager",
    "test_distributed.py::test_a_resumed_two_rank_run_equals_an_uninterrupted_one",
    "test_perf.py::test_inductor_compiled_attack_gradient_equals_eager",
]


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    """The SLOW_FIRST tests first, in that order; the rest as collected (the sort is stable)."""
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(f"{Path(str(item.fspath)).name}::{item.originalname}", len(rank)))


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
