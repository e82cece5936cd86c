"""Inductor's cache is keyed by the CPU's vector ISA: a graph compiled under AVX-512 and reloaded under AVX2 from
a shared cache gave NaN gradients (the cause of test_compile_equals_eager failing in full runs). The step below is a
conv-BN network's forward and backward: with one cache shared by both ISAs (TORCHINDUCTOR_CACHE_DIR set for both
processes) its AVX2 loss came out as 4e23 against 2.30 (2026-12-01), so it reproduces the fault in a third of the
time the smoke training step took."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.compile_cache import CHOSEN_ENV, ENV, cpu_capability, isolate_inductor_cache

REPO = Path(__file__).resolve().parents[1]
STEP = """
import json, torch, engine  # importing engine isolates the cache
from torch import nn
torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1),
                    nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
net = net.to(memory_format=torch.channels_last)
x, y = torch.rand(16, 3, 32, 32).contiguous(memory_format=torch.channels_last), torch.randint(0, 10, (16,))
loss = torch.compile(lambda x, y: nn.functional.cross_entropy(net(x), y), dynamic=False)(x, y)
loss.backward()
grad = net[0].weight.grad
import os
print(json.dumps({"loss": float(loss), "finite": bool(torch.isfinite(grad).all() and torch.isfinite(grad.norm())),
                  "norm": float(grad.norm()), "cache": os.environ["TORCHINDUCTOR_CACHE_DIR"]}))
"""


def compiled_step(tmp_path: Path, capability: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (ENV, "ATEN_CPU_CAPABILITY")}
    env |= {"TMPDIR": str(tmp_path), "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": str(REPO)}
    if capability:
        env["ATEN_CPU_CAPABILITY"] = capability
    out = subprocess.run([sys.executable, "-c", STEP], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cache_dir_depends_on_the_cpu_capability(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    path = isolate_inductor_cache()
    assert torch.backends.cpu.get_cpu_capability().lower() in Path(path).name
    monkeypatch.setenv(ENV, "/chosen/by/user")
    assert isolate_inductor_cache() == "/chosen/by/user"
    # a per-ISA folder a parent engine process chose (inherited): this process's ISA's sibling folder
    monkeypatch.setenv(ENV, "/tmp/parent/arat-avx512-0123abcd")
    monkeypatch.setenv(CHOSEN_ENV, "/tmp/parent/arat-avx512-0123abcd")
    assert isolate_inductor_cache() == str(Path("/tmp/parent") / Path(path).name)
    # a user's folder of a name like it is the user's (helper-114: a pattern took /scratch/arat-cache-20261206)
    monkeypatch.setenv(ENV, "/scratch/arat-cache-20261206")
    assert isolate_inductor_cache() == "/scratch/arat-cache-20261206"


def test_the_cache_dir_is_inductor_s_own_per_account_and_inherited_defaults_are_isolated_too(monkeypatch):
    """The folder is Inductor's default (its own naming, the login name from the password file where $USER is
    unset), not /tmp/torchinductor_user for every account; and a TORCHINDUCTOR_CACHE_DIR that holds Inductor's
    default (Inductor writes it there at its first compile; a child inherits it) still gets the per-ISA folder."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from engine.compile_cache import inductor_default_dir

    monkeypatch.delenv("USER", raising=False)
    monkeypatch.delenv("LOGNAME", raising=False)
    assert inductor_default_dir() == os.path.abspath(default_cache_dir())
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.delenv(CHOSEN_ENV, raising=False)  # both are written below: given back as they were after the test
    isolated = isolate_inductor_cache()
    assert Path(isolated).parent == Path(os.path.abspath(default_cache_dir())) and "torchinductor_user" not in isolated
    monkeypatch.setenv(ENV, default_cache_dir())  # what a parent process's first compile left in the environment
    assert isolate_inductor_cache() == isolated


def test_the_capability_in_a_folder_name_is_one_word_whatever_torch_calls_it():
    """torch 2.6 calls the baseline "NO AVX" (run under torch 2.6: the folder was "arat-no avx-<hash>", where
    the other ISA test expects "arat-default-"); newer ones "DEFAULT"."""
    assert cpu_capability("NO AVX") == cpu_capability("DEFAULT") == "default"
    assert [cpu_capability(name) for name in ("AVX2", "AVX512", "SVE256", "ZVECTOR")] == [
        "avx2", "avx512", "sve256", "zvector"]  # fmt: skip
    assert cpu_capability("some new/ISA") == "some-new-isa" and cpu_capability(" ") == "default"
    assert cpu_capability(torch.backends.cpu.get_cpu_capability()).isidentifier()


@pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
    reason="ATEN_CPU_CAPABILITY=avx2 takes effect on an x86 CPU with AVX2 only",
)
def test_processes_of_two_isas_get_two_folders(tmp_path):
    """Without any compile, on any x86 CPU: a process that runs torch at another ISA (ATEN_CPU_CAPABILITY) gets its
    own cache folder from `import engine`. The ISA test below, which shows why, needs an AVX-512 CPU and is slow."""
    code = "import os, engine; print(os.environ['TORCHINDUCTOR_CACHE_DIR'])"
    folders = []
    for capability in ("default", "avx2", "avx2"):  # the last a child of the first: its folder in the environment
        env = {k: v for k, v in os.environ.items() if k not in (ENV, CHOSEN_ENV)}
        env |= {ENV: str(folders[0]), CHOSEN_ENV: str(folders[0])} if len(folders) == 2 else {}
        env |= {"TMPDIR": str(tmp_path), "PYTHONPATH": str(REPO), "ATEN_CPU_CAPABILITY": capability}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        folders.append(Path(out.stdout.strip().splitlines()[-1]))
    assert folders[0] != folders[1] == folders[2] and folders[0].parent == folders[1].parent
    assert folders[0].name.startswith("arat-default-") and folders[1].name.startswith("arat-avx2-"), folders


@pytest.mark.slow
def test_avx2_after_avx512_in_one_temp_dir_stays_finite(tmp_path):
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("needs an AVX-512 CPU to compile under two ISAs (AVX2 is emulated by ATEN_CPU_CAPABILITY)")
    first = compiled_step(tmp_path, None)
    second = compiled_step(tmp_path, "avx2")  # same TMPDIR: the default cache location is shared
    # the engine's isolation itself, whether or not this torch still mixes the two ISAs' kernels: two folders
    assert first["cache"] != second["cache"] and all(Path(r["cache"]).is_relative_to(tmp_path) for r in (first, second))
    assert first["finite"] and second["finite"], (first, second)
    assert second["loss"] == pytest.approx(first["loss"], rel=1e-5)
    assert second["norm"] == pytest.approx(first["norm"], rel=1e-2)
