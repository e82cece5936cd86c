"""The performance switches change speed, not results: each against the plain path on the same step."""

import pytest
import torch

from engine.config import apply_overrides
from engine.train import build_run, train_step

# No attack steps: PGD's sign() would turn last-bit differences into other adversarial examples.
EXACT = ["perf.dtype=fp32", "attack.num_steps=0", "train.epochs=1"]


def one_step(cfg):
    """Loss, parameter gradients and BN buffers after one training step from the same state and batch."""
    run = build_run(cfg)
    torch.manual_seed(0)
    x, y = next(iter(run.train_loader))
    loss = train_step(run, x, y)["loss"].item()
    grads = {k: p.grad.clone() for k, p in run.nets.raw.named_parameters()}
    return loss, grads, {k: b.clone() for k, b in run.nets.raw.named_buffers()}


def assert_same_step(cfg_a, cfg_b):
    """Losses and BN statistics agree to float precision. Gradients agree to 2% (relative norm): at initialization
    a deep BN network amplifies summation-order differences (~1e-7) on the way back to the first layers (seen:
    ~0.5% at conv1, ~2e-5 at layer4); a wrong normalization or routing differs by O(1)."""
    loss_a, grads_a, buffers_a = one_step(cfg_a)
    loss_b, grads_b, buffers_b = one_step(cfg_b)
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for k, g in grads_a.items():
        assert (g - grads_b[k]).norm() <= 2e-2 * g.norm() + 1e-6, k
    for k, b in buffers_a.items():
        torch.testing.assert_close(b, buffers_b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_dual_forward_equals_two_passes(tiny_cfg):
    base = apply_overrides(tiny_cfg, EXACT)
    assert_same_step(
        apply_overrides(base, ["perf.dual_forward=false"]), apply_overrides(base, ["perf.dual_forward=true"])
    )


def test_fused_kernels_equal_plain_path(tiny_cfg):
    base = apply_overrides(tiny_cfg, EXACT)
    assert_same_step(apply_overrides(base, ["perf.kernels=off"]), apply_overrides(base, ["perf.kernels=on"]))


def test_fused_kernels_in_the_attack(tiny_cfg):
    """With attack steps, the fused PGD step is used (and matches the reference on the same gradients)."""
    import kernels
    from engine.attacks import pgd_step, set_step_kernel
    from engine.attacks.step import pgd_step_reference

    run = build_run(apply_overrides(tiny_cfg, ["perf.kernels=on"]))
    assert run.perf.kernels.startswith("fused")
    x, x_adv, grad = torch.rand(3, 4, 5), torch.rand(3, 4, 5), torch.randn(3, 4, 5)
    torch.testing.assert_close(pgd_step(x, x_adv, grad, 0.03, 0.01), pgd_step_reference(x, x_adv, grad, 0.03, 0.01))
    assert "pgd_step" in kernels.last_backend()
    set_step_kernel(None)


def test_channels_last_equals_contiguous(tiny_cfg):
    base = apply_overrides(tiny_cfg, EXACT)
    assert_same_step(
        apply_overrides(base, ["perf.channels_last=false"]), apply_overrides(base, ["perf.channels_last=true"])
    )


@pytest.mark.slow
def test_compile_equals_eager(tiny_cfg):
    base = apply_overrides(tiny_cfg, EXACT)
    assert_same_step(base, apply_overrides(base, ["perf.compile=true"]))
