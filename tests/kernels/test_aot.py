"""Every Triton kernel x config (fp32, bf16, fp16) compiles for sm_75, sm_80 and sm_90 without a GPU, none spills to
local memory, and no float min/max in its PTX turns a NaN into a number (read on sm_80 and sm_90: sm_75's PTX has no
max.NaN, and Triton guards plain ones there with setp.nan compares and selects).

Runs bench/aot_report.py in a subprocess with TRITON_INTERPRET removed: compilation needs real @triton.jit
functions, and this pytest process may have imported triton under the interpreter (see conftest.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def skip_without_aot() -> None:
    """Triton absent (an optional extra), or one whose ASTSource predates the API kernels/aot.py compiles with
    (triton 3.2, torch 2.6's: kernels/aot.py raises ImportError, and bench/aot_report.py says so in one line)."""
    triton = pytest.importorskip("triton", reason="triton is optional (pip install arat[kernels])")
    import inspect

    from triton.compiler import ASTSource

    if "constexprs" not in inspect.signature(ASTSource).parameters:
        pytest.skip(f"triton {triton.__version__}: its ASTSource predates the AOT compiles' API")


def run_compiling(code: str, timeout: int) -> str:
    """`python -c code` from the repository without TRITON_INTERPRET (compiles need real @triton.jit functions):
    its stdout, the test failing with its output if it fails."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=timeout)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_every_kernel_compiles_for_sm75_sm80_and_sm90_without_spills(tmp_path):
    skip_without_aot()
    from kernels import aot

    out = tmp_path / "aot.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "aot_report.py"), "--out", str(out)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(aot.all_specs()) * len(aot.ARCHS)
    assert {r["arch"] for r in rows} == {"sm_75", "sm_80", "sm_90"}
    assert {s["signature"]["x_ptr"] for s in aot.all_specs() if "x_ptr" in s["signature"]} == {
        "*fp32",
        "*bf16",
        "*fp16",
    }
    for row in rows:
        assert row["spill_store_bytes"] == row["spill_load_bytes"] == row["local_bytes"] == 0, row
        assert 0 < row["registers"] <= 255, row
        # a fused ReLU/clamp must keep NaN, as torch does (sm_75: not read, see kernels.aot)
        assert row["nan_dropping_minmax"] == (None if row["arch"] == "sm_75" else 0), row


RELU_KERNEL = """
import triton
import triton.language as tl


@triton.jit
def relu_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, KEEP_NAN: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    if KEEP_NAN:
        y = tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)
    else:
        y = tl.maximum(x, 0.0)  # tl.maximum's default: NaN becomes 0
    tl.store(out_ptr + offs, y, mask=offs < n)
"""


def test_the_nan_dropping_count_finds_a_plain_relu_and_not_a_nan_keeping_one(tmp_path):
    """The check above reads 0 NaN-dropping min/max in every kernel: its pattern must find one where there is one
    (a ReLU by tl.maximum's default, compiled for sm_80 and sm_90), and none in the NaN-keeping form, else a pattern
    that matched nothing would pass it. The fused ReLU's NaN is GPU-only: the interpreter cannot show it."""
    skip_without_aot()
    from kernels.aot import NAN_DROPPING_MINMAX

    assert NAN_DROPPING_MINMAX.findall("max.f32 %f3, %f1, %f2;\n min.ftz.f32 %f4, %f3, %f2;") == [
        "max.f32",
        "min.ftz.f32",
    ]
    assert NAN_DROPPING_MINMAX.findall("max.NaN.f32 %f3, %f1, %f2;\n max.s32 %r1, %r2, %r3;") == []
    (tmp_path / "relu_aot.py").write_text(RELU_KERNEL)
    code = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "from relu_aot import relu_kernel\n"
        "from kernels import aot\n"
        "sig = {'x_ptr': '*fp32', 'out_ptr': '*fp32', 'n': 'i32', 'BLOCK': 'constexpr', 'KEEP_NAN': 'constexpr'}\n"
        "counts = {}\n"
        "for keep in (0, 1):\n"
        "    spec = {'name': f'relu{keep}', 'fn': relu_kernel, 'signature': sig, 'num_warps': 4,\n"
        "            'constexprs': {'BLOCK': 256, 'KEEP_NAN': keep}, 'values': {'n': 1000}}\n"
        "    counts[keep] = [aot.compile_spec(spec, arch)['nan_dropping_minmax'] for arch in (80, 90)]\n"
        "print(json.dumps(counts))\n"
    )
    counts = json.loads(run_compiling(code, timeout=300).strip().splitlines()[-1])
    assert all(n > 0 for n in counts["0"]), counts  # the plain ReLU: found on sm_80 and sm_90
    assert counts["1"] == [0, 0], counts  # max.NaN.f32: not counted


def test_every_kernel_compiles_with_the_fp64_scalars_inductor_passes():
    """Inductor types a Python float argument of a user-defined Triton kernel as fp64 (direct launches pass fp32);
    tl.sqrt_rn takes fp32 only, which first showed on the H200 as a failed compile of the dual-BN finalize kernel."""
    skip_without_aot()
    code = (
        "from kernels import aot\n"
        "specs = aot.all_specs()\n"
        "assert any('fp32' in s['signature'].values() for s in specs)\n"
        "for spec in specs:\n"
        "    aot.compile_spec(spec, 90, float_scalars='fp64')\n"
        "print(len(specs))\n"
    )
    assert int(run_compiling(code, timeout=600).split()[-1]) > 0


def test_inductor_compiles_every_fused_kernel_for_sm90_without_a_gpu():
    """Inductor's own launches of the triton_op kernels, compiled for sm_90 on fake CUDA tensors (inductor_sm90.py:
    forward graphs, a stand-in H200, nothing run). Before the fp32 casts this failed as the H200 did ("Expected
    dtype ['fp32'] but got fp64" in the dual-BN finalize kernel)."""
    pytest.importorskip("triton", reason="triton is optional (pip install arat[kernels])")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONPATH": str(REPO)}
    script = REPO / "tests" / "kernels" / "inductor_sm90.py"
    result = subprocess.run([sys.executable, str(script)], env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    graphs = json.loads(result.stdout.strip().splitlines()[-1])["graphs"]
    expected = {
        "pgd": {"_uniform_start_kernel", "_pgd_step_kernel"},
        "dual_bn forward": {"_stats_partial_kernel", "_stats_finalize_kernel", "_normalize_kernel"},
        "dual_bn backward": {"_backward_partial_kernel", "_backward_finalize_kernel", "_backward_dx_kernel"},
    }
    for name, kernels in expected.items():
        assert kernels <= set(graphs[name]), (name, graphs[name])
        assert any(k.startswith("triton_") for k in graphs[name]), graphs[name]  # Inductor's own code around them
