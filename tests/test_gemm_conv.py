"""perf.gemm_conv: convolutions with small outputs as one matrix product (engine/models/gemm_conv.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ConfigError, PerfConfig, apply_overrides
from engine.models import GemmConv2d, ResNet18, WideResNet, set_gemm_convs
from engine.models.gemm_conv import conv2d_gemm, output_sizes
from engine.perf import apply
from engine.recipes import get_recipe

LAYER4_3X3 = ["layer4.0.conv1", "layer4.0.conv2", "layer4.1.conv1", "layer4.1.conv2"]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(("k", "stride", "padding", "size"), [(3, 1, 1, 4), (3, 2, 1, 8), (3, 1, 0, 5), (1, 2, 0, 6)])
def test_gemm_convolution_equals_conv2d_with_gradients(k, stride, padding, size, channels_last):
    torch.manual_seed(0)
    x = torch.randn(3, 5, size, size + 1, dtype=torch.float64)
    w = torch.randn(7, 5, k, k, dtype=torch.float64)
    if channels_last:
        x, w = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
    xs, ws = [x.clone().requires_grad_(True) for _ in range(2)], [w.clone().requires_grad_(True) for _ in range(2)]
    ref = F.conv2d(xs[0], ws[0], stride=stride, padding=padding)
    got = conv2d_gemm(xs[1], ws[1], stride, padding)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(ref)
    ref.backward(grad), got.backward(grad)
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ws[1].grad, ws[0].grad, rtol=1e-12, atol=1e-12)


def test_resnet18_switches_its_4x4_convolutions_and_keeps_its_weights():
    torch.manual_seed(0)
    model = ResNet18(width=8).eval()
    x = torch.rand(4, 3, 32, 32)
    before, keys = model(x), list(model.state_dict())
    assert output_sizes(model, 32)["layer4.0.conv1"] == (4, 4) and output_sizes(model, 32)["conv1"] == (32, 32)
    assert set_gemm_convs(model, 4) == LAYER4_3X3  # the 1x1 shortcut stays a convolution
    assert all(type(model.get_submodule(n)) is GemmConv2d for n in LAYER4_3X3)
    assert type(model.layer3[1].conv2) is nn.Conv2d and type(model.layer4[0].shortcut[0]) is nn.Conv2d
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5)
    assert len(set_gemm_convs(model, 8)) == 4 + 4  # layer3's too
    assert set_gemm_convs(model, 0) == [] and not any(isinstance(m, GemmConv2d) for m in model.modules())
    assert torch.equal(model(x), before)


def test_wide_resnet_smallest_outputs_are_8x8():
    model = WideResNet(depth=34, widen=1)
    chosen = set_gemm_convs(model, 8)
    assert chosen and all(name.startswith("block3.") for name in chosen), chosen
    assert set_gemm_convs(model, 4) == []


def test_perf_applies_it_on_a_cpu_only():
    model = ResNet18(width=8)
    _, _, perf = apply(model, PerfConfig(device="cpu", dtype="fp32", compile="off", gemm_conv=4))
    assert perf.gemm_convs == "4 (4 convs with outputs <= 4x4)" and "gemm_conv=4 (4 convs" in perf.summary()
    from engine.perf import _install_gemm_convs

    assert _install_gemm_convs(model, PerfConfig(gemm_conv=4), torch.device("cuda")) == "off (CUDA: cuDNN)"
    assert not any(isinstance(m, GemmConv2d) for m in model.modules())
    assert _install_gemm_convs(model, PerfConfig(), torch.device("cpu")) == "off"


def test_bad_values_are_config_errors():
    for bad in ("-1", "true", "1.5"):
        with pytest.raises(ConfigError, match="perf.gemm_conv"):
            apply_overrides(get_recipe("demo"), [f"perf.gemm_conv={bad}"])
    with pytest.raises(ConfigError, match="perf.gemm_conv"):
        PerfConfig(gemm_conv=True)


@pytest.mark.parametrize("bias", [False, True])
def test_under_bf16_autocast_it_matches_the_convolution_and_its_dtype(bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, 1, 1, bias=bias)
    gemm = GemmConv2d(16, 24, 3, 1, 1, bias=bias)
    gemm.load_state_dict(conv.state_dict())
    x = torch.rand(4, 16, 4, 4).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, got = conv(x), gemm(x)
    assert got.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_a_methods_second_network_follows_the_switch():
    from engine.perf import follow

    net = ResNet18(width=8)
    follow(net, PerfConfig(device="cpu", compile="off", gemm_conv=4), torch.device("cpu"))
    assert [n for n, m in net.named_modules() if isinstance(m, GemmConv2d)] == LAYER4_3X3


def test_the_dry_forward_keeps_every_module_mode_and_statistic():
    model = ResNet18(width=8).train()
    model.layer2.eval()  # a submodule deliberately in eval mode
    before = {k: v.clone() for k, v in model.state_dict().items()}
    set_gemm_convs(model, 4)
    assert model.training and not model.layer2.training and model.layer3.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
