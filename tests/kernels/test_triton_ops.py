"""The triton_op route: on CUDA with compiled Triton the public ops call `arat::*_triton` (torch.library.triton_op),
so torch.compile traces into them and Inductor sees the kernel launches instead of an opaque custom op.

On a CPU: the routing rules; eagerly under the interpreter, with the route opened to CPU tensors, pgd_step,
uniform_start and dual_batch_norm through the triton_ops equal their definitions (forward, gradients, running
buffers; tolerances as in test_pgd_step.py / test_dual_bn.py); in a subprocess with compiled Triton, tracing as
AOTAutograd does shows every kernel launch as a graph node and no opaque op (trace_triton_ops.py). On CUDA (skipped
here; the GPU check runs them): Inductor-compiled == eager through the route, and opcheck of the four ops.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_dual_bn import assert_matches_definition, make_state, make_x, tolerances
from test_pgd_step import ALPHA, EPS, exact_tolerance, make_inputs

import kernels
from kernels import _dispatch, pgd_step, pgd_step_reference

HERE = Path(__file__).resolve().parent
CUDA = torch.device("cuda")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton needs a CUDA device")


@pytest.fixture
def route_on_cpu(monkeypatch, triton_dev):
    """The triton_op route opened to CPU tensors under the interpreter (eager calls launch the kernels directly)."""
    monkeypatch.setattr(_dispatch, "TRACED_TRITON_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(_dispatch, "triton_compiled", lambda: True)
    return triton_dev


def test_routing_rules(monkeypatch):
    monkeypatch.setattr(_dispatch, "triton_compiled", lambda: True)
    eligible = lambda: None  # noqa: E731

    def never_asked():
        raise AssertionError("the layout reason is only computed on the route's devices")

    assert _dispatch.traced_triton(CUDA, eligible)
    assert not _dispatch.traced_triton(torch.device("cpu"), never_asked)  # CPU: the custom op
    assert not _dispatch.traced_triton(CUDA, lambda: "a strided view")  # the custom op falls back, logged
    with kernels.force_backend("reference"):
        assert not _dispatch.traced_triton(CUDA, never_asked)
    with kernels.force_backend("triton"):
        assert _dispatch.traced_triton(CUDA, eligible)
    monkeypatch.setattr(_dispatch, "triton_compiled", lambda: False)  # interpreter or no triton: the custom op
    assert not _dispatch.traced_triton(CUDA, never_asked)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pgd_step_through_the_triton_op(route_on_cpu, dtype):
    x, x_adv, grad = make_inputs((3, 3, 5, 7), dtype=dtype, channels_last=True, device=route_on_cpu)
    out = pgd_step(x, x_adv, grad, EPS, ALPHA)
    assert kernels.last_backend()["pgd_step"] == "triton" and out.stride() == x_adv.stride()
    expected = pgd_step_reference(x, x_adv, grad, EPS, ALPHA)
    torch.testing.assert_close(out, expected, **exact_tolerance("triton", route_on_cpu, dtype))


@pytest.mark.triton
def test_uniform_start_through_the_triton_op(route_on_cpu):
    x = torch.rand(4, 3, 8, 8, device=route_on_cpu)
    torch.manual_seed(0)
    first = kernels.uniform_start(x, EPS)
    torch.manual_seed(0)
    again = kernels.uniform_start(x, EPS)
    assert kernels.last_backend()["uniform_start"] == "triton"
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert (first - x).abs().max() <= EPS + 1e-6 and first.min() >= 0 and first.max() <= 1
    assert (first != x).float().mean() > 0.9  # noise was added


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("training", [True, False])
def test_dual_batch_norm_through_the_triton_ops(route_on_cpu, dtype, training):
    """Forward, input and parameter gradients (the autograd formula registered on the triton_op) and buffers."""
    x, state = make_x((6, 5, 3, 7), True, dtype, route_on_cpu), make_state(5, route_on_cpu)
    assert_matches_definition(x, state, training, relu=True, tol=tolerances(dtype))
    assert kernels.last_backend()["dual_batch_norm"] == "triton"
    assert kernels.last_backend()["dual_batch_norm_backward"] == "triton"


def test_compile_traces_into_the_kernels():
    """What AOTAutograd hands Inductor: one node per kernel launch (1 PGD step, 1 random start, 3 + 3 for dual BN
    forward and backward), no opaque custom op."""
    pytest.importorskip("triton", reason="triton is optional (pip install arat[kernels])")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONPATH": str(HERE.parents[1])}
    result = subprocess.run(
        [sys.executable, str(HERE / "trace_triton_ops.py")],
        env=env,
        cwd=HERE.parents[1],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    traced = json.loads(result.stdout.strip().splitlines()[-1])
    assert traced["pgd_step_backend"] == "triton"
    expected = {"pgd_step": 1, "uniform_start": 1, "dual_batch_norm_with_grad": 6}
    assert {name: traced[name]["kernels"] for name in expected} == expected
    assert all(traced[name]["opaque"] == [] for name in expected)


@needs_cuda
@pytest.mark.triton
def test_inductor_compiled_route_equals_eager_cuda():
    kernels.load_triton_ops()
    x, x_adv, grad = make_inputs((8, 3, 32, 32), channels_last=True, device=CUDA)

    def attack_step(x, x_adv, grad):
        return pgd_step(x, x_adv, grad * 2.0, EPS, ALPHA)

    from torch._inductor.utils import run_and_get_code

    out, code = run_and_get_code(torch.compile(attack_step, fullgraph=True), x, x_adv, grad)
    assert kernels.last_backend()["pgd_step"] == "triton"
    source = "\n".join(code)
    assert "_pgd_step_kernel" in source and "torch.ops.arat" not in source  # Inductor launches the kernel itself
    torch.testing.assert_close(out, attack_step(x, x_adv, grad), rtol=0, atol=0)

    h, state = make_x((16, 64, 8, 8), True, torch.bfloat16, CUDA), make_state(64, CUDA)
    names = ("clean_weight", "clean_bias", "clean_running_mean", "clean_running_var")
    names += ("adv_weight", "adv_bias", "adv_running_mean", "adv_running_var")

    def forward_loss(h, *tensors):
        y = kernels.dual_batch_norm(h, *tensors, training=True, momentum=0.1, eps=1e-5, relu=True)
        return y.float().square().mean()

    eager_state = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in state.items()}
    h_eager = h.detach().clone().requires_grad_()
    torch.compile(forward_loss, fullgraph=True)(h, *(state[k] for k in names)).backward()
    forward_loss(h_eager, *(eager_state[k] for k in names)).backward()
    tol = tolerances(torch.bfloat16)
    torch.testing.assert_close(h.grad, h_eager.grad, **tol["map"])
    for name in names:
        a, b = state[name], eager_state[name]
        torch.testing.assert_close(a.grad if a.requires_grad else a, b.grad if b.requires_grad else b, **tol["param"])


@needs_cuda
@pytest.mark.triton
def test_opcheck_cuda():
    kernels.load_triton_ops()
    x, x_adv, grad = make_inputs((3, 3, 5, 7), channels_last=True, device=CUDA)
    torch.library.opcheck(torch.ops.arat.pgd_step_triton.default, (x, x_adv, grad, EPS, ALPHA))
    seed = torch.tensor([7], device=CUDA)
    torch.library.opcheck(torch.ops.arat.uniform_start_triton.default, (x, EPS, seed))
    h, state = make_x((6, 5, 3, 7), True, torch.float32, CUDA), make_state(5, CUDA)
    order = ("clean_weight", "clean_bias", "adv_weight", "adv_bias")
    order += ("clean_running_mean", "clean_running_var", "adv_running_mean", "adv_running_var")
    args = (h, *(state[k] for k in order), True, 1e-5, True)
    torch.library.opcheck(torch.ops.arat.dual_batch_norm_triton.default, args)
    y, mean, var = (t.detach() for t in torch.ops.arat.dual_batch_norm_triton(*args))
    grad_y = torch.randn_like(y)
    # the backward op runs inside a backward, on inputs needing no grad; given weights that need one, opcheck
    # differentiates the op itself, which has no formula (the H200's failure of 2026-12-04)
    weights = state["clean_weight"].detach(), state["adv_weight"].detach()
    backward_args = (grad_y, h.detach(), y, *weights, mean, var, True, 1e-5, True)
    torch.library.opcheck(torch.ops.arat.dual_batch_norm_backward_triton.default, backward_args)
