"""pgd_step and uniform_start: reference invariants, every backend against the reference, opcheck, compile.

Tolerances: pgd_step is exact on every backend and dtype (each computes in fp32 and rounds once; sign(grad) * alpha
is exact, so there is no reassociation to differ on), with one exception: triton 3.7's interpreter rounds fp32 ->
bf16 toward zero (compiled Triton, like torch, rounds to nearest even), so bf16 under the interpreter is allowed one
bf16 ulp (relative 2**-7). uniform_start agrees across backends in distribution only.
"""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels import pgd_step, pgd_step_reference, uniform_start

EPS, ALPHA = 8 / 255, 2 / 255
LAYOUTS = [  # (shape, channels_last): odd sizes, size-1 dims, non-4-D
    ((3, 3, 5, 7), False),
    ((3, 3, 5, 7), True),
    ((1, 3, 1, 1), True),
    ((5, 1, 3, 2), True),
    ((7,), False),
    ((2, 9), False),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]  # fp16: autocast's on a GPU without bf16


def exact_tolerance(name: str, device: torch.device, dtype: torch.dtype) -> dict:
    interpreted_bf16 = name == "triton" and device.type == "cpu" and dtype == torch.bfloat16
    return {"rtol": 2**-7 if interpreted_bf16 else 0.0, "atol": 0.0}


def make_inputs(shape, dtype=torch.float32, channels_last=False, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=generator)
    x_adv = (x + EPS * (2 * torch.rand(shape, generator=generator) - 1)).clamp(0, 1)
    grad = torch.randn(shape, generator=generator)
    grad.view(-1)[::5] = 0.0  # sign(0) = 0: these entries do not move
    tensors = [t.to(device=device, dtype=dtype) for t in (x, x_adv, grad)]
    if channels_last:
        tensors = [t.contiguous(memory_format=torch.channels_last) for t in tensors]
    return tensors


def test_reference_invariants():
    x, x_adv, grad = make_inputs((4, 3, 6, 5))
    originals = [t.clone() for t in (x, x_adv, grad)]
    out = pgd_step_reference(x, x_adv, grad, EPS, ALPHA)
    assert all(torch.equal(a, b) for a, b in zip((x, x_adv, grad), originals, strict=True))
    assert (out - x).abs().max() <= EPS + 1e-7
    assert out.min() >= 0 and out.max() <= 1
    still = grad == 0
    assert torch.equal(out[still], x_adv[still].clamp(0, 1))


def test_reference_matches_plain_formula():
    x, x_adv, grad = make_inputs((3, 3, 5, 7))
    expected = torch.clamp(torch.clamp(x_adv + ALPHA * grad.sign(), x - EPS, x + EPS), 0, 1)
    torch.testing.assert_close(pgd_step_reference(x, x_adv, grad, EPS, ALPHA), expected, rtol=0, atol=0)


@pytest.mark.parametrize("shape, channels_last", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backend_matches_reference(backend, shape, channels_last, dtype):
    name, device = backend
    x, x_adv, grad = make_inputs(shape, dtype, channels_last, device)
    out = pgd_step(x, x_adv, grad, EPS, ALPHA)
    assert kernels.last_backend()["pgd_step"] == name
    assert out.dtype == dtype and out.stride() == x_adv.stride()
    # the plain formula in fp32, rounded once (not pgd_step_reference: the `reference` backend is that function)
    x32, g = x.float(), grad.float()
    expected = torch.clamp(torch.clamp(x_adv.float() + ALPHA * g.sign(), x32 - EPS, x32 + EPS), 0, 1).to(dtype)
    torch.testing.assert_close(out, expected, **exact_tolerance(name, device, dtype))


def test_backend_mixed_layouts_and_nan(backend):
    """x contiguous while x_adv is channels-last (restrided first); NaN grad does not move (torch.sign(nan) == 0),
    NaN in x_adv propagates, and so does NaN in x (the projection's bounds, as torch.clamp's tensor bounds)."""
    _, device = backend
    x, x_adv, grad = make_inputs((3, 4, 5, 3), device=device)
    x_adv = x_adv.contiguous(memory_format=torch.channels_last)
    grad[0, 0, 0, 0] = float("nan")
    x_adv[1, 0, 0, 0] = float("nan")
    x[2, 0, 0, 0] = float("nan")
    out = pgd_step(x, x_adv, grad, EPS, ALPHA)
    assert out.is_contiguous(memory_format=torch.channels_last)
    step = torch.where(grad > 0, ALPHA, torch.where(grad < 0, -ALPHA, 0.0))  # a NaN gradient: no step (not sign's)
    expected = torch.clamp(torch.clamp(x_adv + step, x - EPS, x + EPS), 0, 1)  # the plain formula
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
    assert out[0, 0, 0, 0] == x_adv[0, 0, 0, 0] and out[1, 0, 0, 0].isnan() and out[2, 0, 0, 0].isnan()


def test_opcheck(backend):
    _, device = backend
    x, x_adv, grad = make_inputs((3, 3, 5, 7), channels_last=True, device=device)
    torch.library.opcheck(torch.ops.arat.pgd_step.default, (x, x_adv, grad, EPS, ALPHA))


def test_compile_fullgraph_equals_eager(backend):
    _, device = backend
    x, x_adv, grad = make_inputs((3, 3, 5, 7), device=device)
    compiled = torch.compile(pgd_step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(
        compiled(x, x_adv, grad, EPS, ALPHA), pgd_step(x, x_adv, grad, EPS, ALPHA), rtol=0, atol=0
    )


def test_compile_inductor_equals_eager():
    x, x_adv, grad = make_inputs((3, 3, 5, 7))

    def attack_step(x, x_adv, grad):
        return pgd_step(x, x_adv, grad * 2.0, EPS, ALPHA)  # something for inductor to fuse around the op

    compiled = torch.compile(attack_step, fullgraph=True)
    torch.testing.assert_close(compiled(x, x_adv, grad), attack_step(x, x_adv, grad), rtol=0, atol=0)


@pytest.mark.parametrize(
    "args, message",
    [(((2, 3), (2, 3), (3, 2), EPS, ALPHA), "one shape"), (((4,), (4,), (4,), -1.0, ALPHA), "eps >= 0")],
)
def test_bad_input_raises(args, message):
    *shapes, eps, alpha = args
    with pytest.raises(ValueError, match=message):
        pgd_step(*(torch.zeros(s) for s in shapes), eps, alpha)


@pytest.fixture
def rng_backend(backend):
    if backend[0] == "native":
        pytest.skip("uniform_start has no native kernel: on CPU it always runs the reference")
    return backend


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_uniform_start_in_ball_and_deterministic(rng_backend, dtype, channels_last):
    name, device = rng_backend
    x = torch.rand(4, 3, 9, 7, device=device).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    first = uniform_start(x, EPS)
    torch.manual_seed(0)
    second = uniform_start(x, EPS)
    third = uniform_start(x, EPS)
    assert kernels.last_backend()["uniform_start"] == name
    assert torch.equal(first, second) and not torch.equal(first, third)
    assert first.dtype == dtype and first.stride() == x.stride()
    # one rounding of the noisy value: bf16 (below 1, half an ulp is 2^-9, the interpreter truncates: 2^-8), fp16 2^-11
    bf16_slack = {torch.float32: 0.0, torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
    assert (first.float() - x.float()).abs().max() <= EPS + 1e-6 + bf16_slack
    assert first.min() >= 0 and first.max() <= 1


def test_uniform_start_distribution(rng_backend):
    """Noise away from the [0, 1] clamp is U(-eps, eps): mean ~ 0, std ~ eps / sqrt(3), deciles evenly spaced."""
    _, device = rng_backend
    x = torch.full((64, 3, 16, 16), 0.5, device=device)
    noise = (uniform_start(x, EPS) - x).flatten().float().cpu() / EPS  # ~ U(-1, 1), 49152 samples
    assert abs(noise.mean()) < 0.02 and abs(noise.std() - 3**-0.5) < 0.01
    deciles = torch.quantile(noise[:16384], torch.linspace(0.1, 0.9, 9))
    torch.testing.assert_close(deciles, torch.linspace(-0.8, 0.8, 9), rtol=0, atol=0.03)


def test_uniform_start_generator_argument():
    x = torch.rand(2, 3, 4, 4)
    first = uniform_start(x, EPS, generator=torch.Generator().manual_seed(3))
    second = uniform_start(x, EPS, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, second)
    with pytest.raises(ValueError, match="eps >= 0"):
        uniform_start(x, -0.1)


def test_uniform_start_opcheck_and_compile(rng_backend):
    _, device = rng_backend
    x = torch.rand(3, 3, 5, 7, device=device)
    seed = torch.tensor([1234], device=device)
    torch.library.opcheck(torch.ops.arat.uniform_start.default, (x, EPS, seed))
    compiled = torch.compile(uniform_start, fullgraph=True, backend="aot_eager")
    torch.manual_seed(5)
    expected = uniform_start(x, EPS)
    torch.manual_seed(5)
    torch.testing.assert_close(compiled(x, EPS), expected, rtol=0, atol=0)


@pytest.mark.parametrize("alpha", [float("inf"), 1e30])
def test_every_implementation_agrees_at_an_unbounded_step(backend, alpha):
    """Issue 11 item 5: at alpha = inf a zero gradient does not move (no inf * 0 = NaN); the engine's plain-torch
    step, the kernels' reference and every backend give the same finite result: the eps-ball's boundary."""
    from engine.attacks.step import pgd_step_reference as engine_step

    _, device = backend
    x, x_adv, grad = make_inputs((3, 3, 5, 7), device=device)
    grad[0, 0, 0, 0] = float("nan")
    expected = torch.where(grad > 0, (x + EPS).clamp(0, 1), torch.where(grad < 0, (x - EPS).clamp(0, 1), x_adv))
    for out in (pgd_step(x, x_adv, grad, EPS, alpha), pgd_step_reference(x, x_adv, grad, EPS, alpha),
                engine_step(x, x_adv, grad, EPS, alpha)):  # fmt: skip
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "channels_last"), LAYOUTS[:2])
def test_the_engine_s_plain_step_equals_the_kernels_reference_in_every_dtype(shape, channels_last, dtype):
    """The engine's own step (its path when no kernel is installed) gives the kernels' reference bit for bit, in
    x_adv's dtype and memory format: a bf16/fp16 x_adv stepped in float32 and rounded once. It returned float32
    for bf16/fp16 before (the step's float32 scalars promoted the sum), its bounds rounded in bf16."""
    from engine.attacks.step import pgd_step_reference as engine_step

    x, x_adv, grad = make_inputs(shape, dtype, channels_last)
    out, expected = engine_step(x, x_adv, grad, EPS, ALPHA), pgd_step_reference(x, x_adv, grad, EPS, ALPHA)
    assert out.dtype == dtype and out.stride() == expected.stride() == x_adv.stride()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_layout_matching_refuses_another_shape():
    """helper-151: `like` returned a tensor of matching strides unchanged whatever its shape, so the raw Triton op
    given an `x` of twice the batch read its first half as if it were all of it; now copy_'s error."""
    from kernels._layout import like

    template = torch.zeros(4, 3, 4, 4)
    same = torch.ones(4, 3, 4, 4)
    assert like(same, template) is same
    larger = torch.ones(8, 3, 4, 4)
    assert larger[:4].stride() == template.stride()
    with pytest.raises(RuntimeError):
        like(larger, template)
    cl = like(same, template.contiguous(memory_format=torch.channels_last))
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, same)
