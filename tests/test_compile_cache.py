"""Inductor's cache is keyed by the CPU's vector ISA: a graph compiled under AVX-512 and reloaded under AVX2 from
a shared cache gave NaN gradients (the cause of test_compile_equals_eager failing in full runs)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.compile_cache import ENV, isolate_inductor_cache

REPO = Path(__file__).resolve().parents[1]
STEP = """
import json, torch
from engine.config import apply_overrides
from engine.recipes import get_recipe
from engine.train import build_run, train_step
cfg = apply_overrides(get_recipe("smoke"), ["perf.dtype=fp32", "attack.num_steps=0", "perf.compile=true"])
run = build_run(cfg)
torch.manual_seed(0)
x, y = next(iter(run.train_loader))
loss = float(train_step(run, x, y)["loss"])
grad = run.nets.raw.conv1.weight.grad
print(json.dumps({"loss": loss, "finite": bool(torch.isfinite(grad).all()), "norm": float(grad.norm())}))
"""


def compiled_step(tmp_path: Path, capability: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (ENV, "ATEN_CPU_CAPABILITY")}
    env |= {"TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO)}
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


@pytest.mark.slow
def test_avx2_after_avx512_in_one_temp_dir_stays_finite(tmp_path):
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("needs an AVX-512 CPU to compile under two ISAs (AVX2 is emulated by ATEN_CPU_CAPABILITY)")
    first = compiled_step(tmp_path, None)
    second = compiled_step(tmp_path, "avx2")  # same TMPDIR: the default cache location is shared
    assert first["finite"] and second["finite"], (first, second)
    assert second["loss"] == pytest.approx(first["loss"], rel=1e-5)
    assert second["norm"] == pytest.approx(first["norm"], rel=1e-2)
