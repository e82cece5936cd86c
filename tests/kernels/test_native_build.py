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
        # quiet: torch's headers are system headers (no -Wextra wall from them), no run-path or kineto warning
        said = (result.stdout + result.stderr).lower()
        assert "warning" not in said, result.stdout[-3000:] + result.stderr[-3000:]
    library = build / "libarat_native.so"
    assert library.is_file()
    # A fresh process: a TORCH_LIBRARY namespace can be registered once per process, and this one may hold it.
    smoke = SMOKE.format(repo=str(REPO), lib=str(library))
    result = subprocess.run([sys.executable, "-c", smoke], capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == "ok", result.stdout + result.stderr


def _configure_against(tmp_path, config_text: str) -> tuple[subprocess.CompletedProcess, str]:
    """Configure the library against a stand-in torch install: the real torch's headers and libraries, and a
    TorchConfig.cmake holding `config_text`. Returns the configure result and the compile command of one source."""
    real = Path(torch.utils.cmake_prefix_path).parents[1]  # torch/ (share/cmake's grandparent)
    fake = tmp_path / "torch"
    (fake / "share" / "cmake" / "Torch").mkdir(parents=True)
    (fake / "include").symlink_to(real / "include")
    (fake / "lib").symlink_to(real / "lib")
    (fake / "share" / "cmake" / "Torch" / "TorchConfig.cmake").write_text(config_text)
    build = tmp_path / "build"
    result = subprocess.run(
        ["cmake", "-S", str(REPO), "-B", str(build), f"-DCMAKE_PREFIX_PATH={fake / 'share' / 'cmake'}",
         "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    commands = build / "compile_commands.json"
    return result, commands.read_text() if commands.is_file() else ""


# What torch's own config does when torch is a CUDA build (PyPI's default wheel) on a machine without the CUDA
# toolkit: it stops configuring, though this library is CPU code (seen with torch 2.11's wheel, 2026-12-07).
CUDA_BUILD_WITHOUT_TOOLKIT = """
message(FATAL_ERROR "Your installed Caffe2 version uses CUDA but I cannot find the CUDA libraries.")
"""


@pytest.mark.parametrize("abi", ["0", "1", None])
def test_configures_against_a_cuda_torch_without_its_toolkit_and_takes_its_abi(tmp_path, abi):
    if shutil.which("cmake") is None or shutil.which("c++") is None:
        pytest.skip("cmake and a C++ compiler are needed to configure the native library")
    # as torch 2.6's TorchConfig.cmake says it (torch 2.11's has no such line)
    abi_flag = f'set(TORCH_CXX_FLAGS "-D_GLIBCXX_USE_CXX11_ABI={abi}")'
    flags = "" if abi is None else f'if(CMAKE_SYSTEM_NAME STREQUAL "Linux")\n  {abi_flag}\nendif()\n'
    result, commands = _configure_against(tmp_path, flags + CUDA_BUILD_WITHOUT_TOOLKIT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "warning" not in (result.stdout + result.stderr).lower(), result.stderr[-3000:]
    assert "libtorch_cpu" in (tmp_path / "build" / "CMakeCache.txt").read_text()
    # torch 2.6's Linux wheels were built with the old libstdc++ ABI: the library must be too, or it fails to load
    assert ("-D_GLIBCXX_USE_CXX11_ABI=0" in commands) == (abi == "0" and sys.platform.startswith("linux"))


def test_a_prefix_without_torch_is_one_message_naming_what_to_set(tmp_path):
    if shutil.which("cmake") is None or shutil.which("c++") is None:
        pytest.skip("cmake and a C++ compiler are needed to configure the native library")
    result = subprocess.run(
        ["cmake", "-S", str(REPO), "-B", str(tmp_path / "build"), f"-DCMAKE_PREFIX_PATH={tmp_path / 'nothing'}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    assert "CMAKE_PREFIX_PATH" in result.stderr and "cmake_prefix_path" in result.stderr, result.stderr


@pytest.mark.parametrize(("config_says", "built_with"), [(None, "17"), ("17", "17"), ("20", "20")])
def test_compiles_with_the_cxx_standard_torch_asks_for(tmp_path, config_says, built_with):
    """torch 2.14's headers refuse anything older than C++20 (`#error C++20 or later compatible compiler is required
    to use ATen`, 2026-12-07: the library did not build); its config and 2.13's set CXX_STANDARD 20 on torch's own
    target, 2.11's and 2.6's 17: the library takes the newer of 17 and that."""
    if shutil.which("cmake") is None or shutil.which("c++") is None:
        pytest.skip("cmake and a C++ compiler are needed to configure the native library")
    says = f"set_target_properties(torch PROPERTIES\n    CXX_STANDARD {config_says}\n)\n"  # as torch's config says it
    target = "" if config_says is None else says
    result, commands = _configure_against(tmp_path, target + CUDA_BUILD_WITHOUT_TOOLKIT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    standards = {word[-2:] for word in commands.split() if word.startswith("-std=")}
    assert standards == {built_with}, commands
