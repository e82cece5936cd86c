"""dual_batch_norm on every backend against its definition: two F.batch_norm calls (clean rows, adversarial rows).

Tolerances (vs the F.batch_norm definition, which reduces in another order and computes (x - mean) * invstd * w + b
where the kernels compute x * scale + shift): fp32 outputs and input gradients 1e-5 abs / 1e-4 rel, parameter
gradients (sums over B*H*W terms) 1e-4 / 1e-4, running buffers 1e-6 / 1e-5. bf16 inputs (fp32 parameters): one or
two bf16 roundings of the output, 2e-2 / 2e-2 on maps, 5e-2 on parameter gradients, running buffers 1e-4 / 1e-4.
fp16 inputs (what autocast picks on a GPU without bf16): 2e-3 / 2e-3 on maps, 1e-3 on parameter gradients (the
interpreter's worst: 9.8e-4 on outputs, 1.2e-4 on parameter gradients; a kernel that rounded fp16 inputs to bf16 was
23% off and passed bf16's tolerances), running buffers 1e-4 / 1e-4.
"""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels import dual_batch_norm, dual_batch_norm_reference

CASES = [  # (2B, C, H, W), channels_last: odd sizes, C not a power of two, B = 1, 1x1 spatial, and shapes with
    # several spatial blocks (H*W = 144 > BLOCK_S, with a tail) and several channel blocks (C = 70 > BLOCK_C = 64)
    ((6, 5, 3, 7), True),
    ((6, 5, 3, 7), False),
    ((2, 3, 4, 5), True),
    ((4, 12, 1, 1), False),
    ((4, 5, 12, 12), True),
    ((4, 5, 12, 12), False),
    ((4, 70, 3, 3), True),
]
NAMES = (
    "clean_weight",
    "clean_bias",
    "clean_running_mean",
    "clean_running_var",
    "adv_weight",
    "adv_bias",
    "adv_running_mean",
    "adv_running_var",
)


def tolerances(dtype: torch.dtype) -> dict[str, dict]:
    if dtype == torch.float32:
        return {
            "map": {"atol": 1e-5, "rtol": 1e-4},
            "param": {"atol": 1e-4, "rtol": 1e-4},
            "buffer": {"atol": 1e-6, "rtol": 1e-5},
        }
    if dtype == torch.float16:
        return {
            "map": {"atol": 2e-3, "rtol": 2e-3},
            "param": {"atol": 1e-3, "rtol": 1e-3},
            "buffer": {"atol": 1e-4, "rtol": 1e-4},
        }
    return {
        "map": {"atol": 2e-2, "rtol": 2e-2},
        "param": {"atol": 5e-2, "rtol": 5e-2},
        "buffer": {"atol": 1e-4, "rtol": 1e-4},
    }


def make_state(channels: int, device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Distinct clean and adversarial parameters and buffers; weights and biases require grad."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for prefix in ("clean", "adv"):
        state[f"{prefix}_weight"] = 1 + 0.3 * torch.randn(channels, generator=g)
        state[f"{prefix}_bias"] = 0.3 * torch.randn(channels, generator=g)
        state[f"{prefix}_running_mean"] = 0.1 * torch.randn(channels, generator=g)
        state[f"{prefix}_running_var"] = 0.5 + torch.rand(channels, generator=g)
    return {k: v.to(device).requires_grad_(k.endswith(("weight", "bias"))) for k, v in state.items()}


def make_x(shape, channels_last: bool, dtype, device, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = (2 * torch.randn(shape, generator=g) + 0.5).to(device=device, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    return x.requires_grad_()


def clone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in state.items()}


def run(fn, x, state, training, relu, momentum=0.1):
    """Forward + backward with a fixed upstream gradient; returns y and x's gradient."""
    y = fn(x, *(state[k] for k in NAMES), training=training, momentum=momentum, eps=1e-5, relu=relu)
    grad_y = torch.linspace(-1, 1, y.numel(), device=y.device).reshape(y.shape).to(y.dtype)
    y.backward(grad_y)
    return y, x.grad


def assert_matches_definition(x, state, training, relu, tol, momentum=0.1):
    x_ref, state_ref = x.detach().clone().requires_grad_(), clone(state)
    y, grad_x = run(dual_batch_norm, x, state, training, relu, momentum)
    y_ref, grad_x_ref = run(dual_batch_norm_reference, x_ref, state_ref, training, relu, momentum)
    assert y.dtype == x.dtype and y.stride() == x.stride() and grad_x.stride() == x.stride()
    torch.testing.assert_close(y, y_ref, **tol["map"])
    torch.testing.assert_close(grad_x, grad_x_ref, **tol["map"])
    for name in NAMES:
        if state[name].requires_grad:
            torch.testing.assert_close(state[name].grad, state_ref[name].grad, **tol["param"], msg=name)
        else:
            torch.testing.assert_close(state[name], state_ref[name], **tol["buffer"], msg=name)


@pytest.mark.parametrize("shape, channels_last", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])  # fp16: a GPU without bf16
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("relu", [False, True])
def test_backend_matches_definition(backend, shape, channels_last, dtype, training, relu):
    name, device = backend
    x = make_x(shape, channels_last, dtype, device)
    assert_matches_definition(x, make_state(shape[1], device), training, relu, tolerances(dtype))
    assert kernels.last_backend()["dual_batch_norm"] == name
    assert kernels.last_backend()["dual_batch_norm_backward"] == name


@pytest.mark.parametrize("training", [True, False])
def test_a_nan_stays_a_nan_as_in_torch(backend, training):
    """A diverged step (a NaN or inf reaching a batch norm) must show in the loss, as with torch: torch.relu keeps
    NaN, and its backward lets the gradient through where y is NaN (threshold_backward zeroes only y <= 0). The
    fused ReLU's tl.maximum compiled to max.f32, which turns NaN into 0, on a GPU; the interpreter cannot show that
    (numpy keeps NaN): tests/kernels/test_aot.py reads every kernel's PTX for such min/max instructions."""
    _, device = backend
    x = make_x((6, 5, 3, 7), True, torch.float32, device)
    with torch.no_grad():
        x[1, 2, 1, 1] = float("nan")  # the clean half's channel 2
    state = make_state(5, device)
    x_ref, state_ref = x.detach().clone().requires_grad_(), clone(state)
    y, grad_x = run(dual_batch_norm, x, state, training, True)
    y_ref, grad_x_ref = run(dual_batch_norm_reference, x_ref, state_ref, training, True)
    assert y_ref.isnan().any() and (training or grad_x_ref[1, 2, 1, 1].isfinite())  # the case at hand
    tol = {k: v | {"equal_nan": True} for k, v in tolerances(torch.float32).items()}
    torch.testing.assert_close(y, y_ref, **tol["map"])
    torch.testing.assert_close(grad_x, grad_x_ref, **tol["map"])
    for name in NAMES:
        got, want = (
            (state[name].grad, state_ref[name].grad) if state[name].requires_grad else (state[name], state_ref[name])
        )
        torch.testing.assert_close(got, want, **tol["param"], msg=name)


def test_shared_parameter_set(backend):
    """One parameter set passed twice: gradients add up, buffers are updated clean then adv (as two calls)."""
    _, device = backend
    state = make_state(5, device)
    for prefix in ("weight", "bias", "running_mean", "running_var"):
        state[f"adv_{prefix}"] = state[f"clean_{prefix}"]
    x = make_x((6, 5, 3, 7), True, torch.float32, device)
    x_ref, state_ref = x.detach().clone().requires_grad_(), clone(state)
    for prefix in ("weight", "bias", "running_mean", "running_var"):
        state_ref[f"adv_{prefix}"] = state_ref[f"clean_{prefix}"]
    y, grad_x = run(dual_batch_norm, x, state, True, True, momentum=0.3)
    y_ref, grad_x_ref = run(dual_batch_norm_reference, x_ref, state_ref, True, True, momentum=0.3)
    tol = tolerances(torch.float32)
    torch.testing.assert_close(y, y_ref, **tol["map"])
    torch.testing.assert_close(grad_x, grad_x_ref, **tol["map"])
    for name in ("clean_weight", "clean_bias"):
        torch.testing.assert_close(state[name].grad, state_ref[name].grad, **tol["param"])
    for name in ("clean_running_mean", "clean_running_var"):
        torch.testing.assert_close(state[name], state_ref[name], **tol["buffer"])


def test_many_chunks(backend, monkeypatch):
    """More partial chunks than a finalize iteration sums (Triton: > BLOCK_P), strided chunks (native: B > 32)."""
    name, device = backend
    if name == "triton":
        from kernels.dual_bn import triton_impl

        monkeypatch.setattr(triton_impl, "program_target", lambda device: 256)
        x = make_x((2 * 20, 3, 7, 7), False, torch.float32, device)
        assert triton_impl.plan(x).num_chunks > triton_impl.BLOCK_P
    else:
        x = make_x((2 * 37, 3, 3, 2), True, torch.float32, device)
    assert_matches_definition(x, make_state(3, device), True, False, tolerances(torch.float32))


@pytest.mark.parametrize("channels_last", [True, False])
def test_variance_is_stable_for_large_mean(backend, channels_last):
    """|mean| / std = 1e3 in fp32: the shifted sums keep the variance; E[x^2] - E[x]^2 would lose it entirely."""
    _, device = backend
    g = torch.Generator().manual_seed(0)
    x = (1000.0 + torch.randn(2 * 8, 4, 6, 6, generator=g)).to(device)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    state = make_state(4, device)
    dual_batch_norm(x, *(state[k] for k in NAMES), training=True, momentum=1.0)  # running_var = batch var
    x64 = x.double().unflatten(0, (2, -1))
    truth = x64.var(dim=(1, 3, 4), unbiased=True)  # (2, C)
    measured = torch.stack([state["clean_running_var"], state["adv_running_var"]]).double()
    torch.testing.assert_close(measured, truth, rtol=2e-3, atol=0)


def test_opcheck(backend):
    _, device = backend
    x = make_x((6, 5, 3, 7), True, torch.float32, device)
    state = make_state(5, device)
    params = [state[k] for k in ("clean_weight", "clean_bias", "adv_weight", "adv_bias")]
    buffers = [state[k] for k in ("clean_running_mean", "clean_running_var", "adv_running_mean", "adv_running_var")]
    for training, relu in ((True, True), (False, False)):
        torch.library.opcheck(torch.ops.arat.dual_batch_norm.default, (x, *params, *buffers, training, 1e-5, relu))
    y, mean, var = torch.ops.arat.dual_batch_norm(x, *params, *buffers, True, 1e-5, True)
    args = (
        torch.randn_like(y),
        x.detach(),
        y.detach(),
        params[0].detach(),
        params[2].detach(),
        mean,
        var,
        True,
        1e-5,
        True,
    )
    torch.library.opcheck(torch.ops.arat.dual_batch_norm_backward.default, args)


def _forward_loss(x, state):
    y = dual_batch_norm(x, *(state[k] for k in NAMES), training=True, momentum=0.1, eps=1e-5, relu=True)
    return y, (y * y).sum()


def test_compile_fullgraph_equals_eager(backend):
    """aot_eager: dynamo + AOTAutograd over the fake impls, the op bodies run on the forced backend."""
    _, device = backend
    _check_compiled_equals_eager("aot_eager", device)


def test_compile_inductor_equals_eager():
    """Once with inductor (CPU, default backends): the running-buffer update around the op is compiled too."""
    _check_compiled_equals_eager("inductor", torch.device("cpu"))


def _check_compiled_equals_eager(compile_backend: str, device: torch.device) -> None:
    x = make_x((6, 5, 3, 7), True, torch.float32, device)
    state = make_state(5, device)
    x_c, state_c = x.detach().clone().requires_grad_(), clone(state)
    y, loss = _forward_loss(x, state)
    y_c, loss_c = torch.compile(_forward_loss, fullgraph=True, backend=compile_backend)(x_c, state_c)
    loss.backward()
    loss_c.backward()  # through the compiled graph's backward (AOTAutograd), i.e. the registered backward op
    tol = tolerances(torch.float32)
    torch.testing.assert_close(y_c, y, **tol["map"])
    torch.testing.assert_close(x_c.grad, x.grad, **tol["map"])
    for key in NAMES:
        if state[key].requires_grad:
            torch.testing.assert_close(state_c[key].grad, state[key].grad, **tol["param"], msg=key)
        else:
            torch.testing.assert_close(state_c[key], state[key], **tol["buffer"], msg=key)


@pytest.mark.parametrize(
    "shape, channels, kwargs, message",
    [
        ((5, 3, 2, 2), 3, {}, "clean rows first"),
        ((4, 3, 2, 2), 4, {}, r"shape \(3,\)"),
        ((2, 3, 1, 1), 3, {}, "more than one value"),
        ((4, 3, 2, 2), 3, {"momentum": 1.5}, "momentum"),
        ((4, 3, 2, 2), 3, {"momentum": None}, "momentum"),
    ],
)
def test_bad_input_raises(shape, channels, kwargs, message):
    state = make_state(channels, "cpu")
    with pytest.raises(ValueError, match=message):
        dual_batch_norm(torch.randn(shape), *(state[k] for k in NAMES), training=True, **kwargs)


def test_missing_affine_parameters_raise():
    state = make_state(3, "cpu")
    state["adv_weight"] = None
    with pytest.raises(ValueError, match="affine=True"):
        dual_batch_norm(torch.randn(4, 3, 2, 2), *(state[k] for k in NAMES), training=True)


def test_launch_arithmetic_matches_tritons_and_plans_are_cached():
    """The launchers' plain-Python next_pow2 / cdiv (Triton's own are constexpr functions, ~4 us of Python per
    call) give Triton's values, and a fixed shape's plan is computed once."""
    triton = pytest.importorskip("triton")
    from kernels._triton_util import cdiv, next_pow2, program_target
    from kernels.dual_bn import triton_impl

    for n in range(0, 3000):
        assert next_pow2(n) == triton.next_power_of_2(max(n, 1)), n
    for a in range(1, 300):
        for b in (1, 2, 3, 7, 16, 64, 128, 1000):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)
    x = torch.empty((256, 64, 32, 32)).to(memory_format=torch.channels_last)
    first = triton_impl.plan(x)
    assert triton_impl.plan(x) is first and first == triton_impl.make_plan(x.shape, True, program_target(x.device))
    assert triton_impl.plan(torch.empty((256, 64, 32, 32))).channels_last is False


def test_an_empty_batch_in_evaluation_is_empty_as_in_torch():
    """No kernel is launched for an empty batch (the Triton plan divided by its zero tiles): the reference path
    answers (on CUDA where there is one)."""
    from kernels.dual_bn.op import _kernel_reason

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    state = make_state(3, device)
    x = torch.empty((0, 3, 4, 4), device=device).contiguous(memory_format=torch.channels_last)
    assert _kernel_reason(x, (), tuple(state[k] for k in NAMES)) == "an empty batch"
    y = dual_batch_norm(x, *(state[k] for k in NAMES), training=False, relu=True)
    assert y.shape == x.shape and y.numel() == 0
