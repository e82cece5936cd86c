"""The native library builds from a clean tree with the documented CMake commands and its ops load and run.

Slow (a from-scratch C++ build, ~40 s on 2 cores): marked `slow`. The equivalence tests of the native backend live
with each op (test_pgd_step.py, test_dual_bn.py) and use build/libarat_native.so when it exists.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SMOKE = """
import sys, torch
sys.path.insert(0, {repo!r})
import kernels
assert kernels.load_native({lib!r})
x = torch.rand(4, 3, 5, 5)
assert torch.equal(torch.ops.arat_native.pgd_step(x, x, x - 0.5, 0.1, 0.05),
                   kernels.pgd_step_reference(x, x, x - 0.5, 0.1, 0.05))
state = [torch.ones(3), torch.zeros(3), torch.zeros(3), torch.ones(3)] * 2
y, mean, var = torch.ops.arat_native.dual_bn_forward(x, *state[:2], *state[4:6], *state[2:4], *state[6:], True,
                                                     1e-5, False)
torch.testing.assert_close(y, kernels.dual_batch_norm_reference(x, *state, training=True))
print("ok")
"""


@pytest.mark.slow
@pytest.mark.timeout(2160)  # past its subprocesses' own limits (configure and build 900 s each, smoke 300 s)
def test_cmake_build_from_scratch(tmp_path):
    if shutil.which("cmake") is None or shutil.which("c++") is None:
        pytest.skip("cmake and a C++ compiler are needed to build the native library")
    build = tmp_path / "build"
    configure = ["cmake", "-S", str(REPO), "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    for cmd in (configure, ["cmake", "--build", str(build), "-j2"]):
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    library = build / "libarat_native.so"
    assert library.is_file()
    # A fresh process: a TORCH_LIBRARY namespace can be registered once per process, and this one may hold it.
    smoke = SMOKE.format(repo=str(REPO), lib=str(library))
    result = subprocess.run([sys.executable, "-c", smoke], capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == "ok", result.stdout + result.stderr
