import pytest
import torch
from precision import assert_near_reference, perturbed

from engine.config import ModelConfig
from engine.models import build_model, export_state_dict, load_plain


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_parameter_counts_match_method():
    """Exact counts (METHOD: ~11.17M and ~46.16M): the CIFAR ResNet-18 (3x3 stem, 1x1 projection shortcuts, biased
    classifier) and WRN-34-10 (pre-activation, 1x1 shortcuts where the width changes) as the literature gives them
    (11,173,962 and 46,160,474): a missing BN's affine pair, shortcut or bias changes them."""
    assert n_params(build_model(ModelConfig(split_bn=False), 10)) == 11_173_962
    assert n_params(build_model(ModelConfig(arch="wrn34-10", split_bn=False), 10)) == 46_160_474


def test_feature_taps():
    x = torch.rand(4, 3, 32, 32)
    logits, feats = build_model(ModelConfig(width=8), 10)(x, bn="adv", features=True)
    assert logits.shape == (4, 10) and [f.shape for f in feats] == [(4, 64)] * 4
    assert all((f >= 0).all() for f in feats)  # z = GAP(ReLU(.))


def test_wrn_taps_shape():
    m = build_model(ModelConfig(arch="wrn34-10"), 10)
    assert m.feature_dims == [320] + [640] * 10


def bn_outputs(model, names):
    """{name: output} of the (Split-)BN modules `names` in the next forward (with `relu=True`, after the ReLU)."""
    seen, hooks = {}, []
    for name in names:
        hooks.append(
            model.get_submodule(name).register_forward_hook(lambda m, a, out, n=name: seen.__setitem__(n, out))
        )
    return seen, hooks


def test_resnet_taps_are_relu_bn1_and_relu_bn2_before_the_residual_add_of_both_layer4_blocks():
    """METHOD 4: z = GAP(ReLU(.)) of bn1 and of bn2 (before the add) in each layer4 block; the block's output
    after the add (also ReLU'd, as wide) would pass a shape-and-sign test."""
    torch.manual_seed(0)
    m = build_model(ModelConfig(width=8), 10).eval()
    names = ["layer4.0.bn1", "layer4.0.bn2", "layer4.1.bn1", "layer4.1.bn2"]
    seen, hooks = bn_outputs(m, names)
    _, taps = m(torch.rand(4, 3, 32, 32), bn="adv", features=True)
    for h in hooks:
        h.remove()
    want = [torch.relu(seen[n]).mean(dim=(2, 3)) for n in names]
    assert all(torch.equal(t, w) for t, w in zip(taps, want, strict=True))


def test_wrn_taps_are_relu1_and_relu2_of_the_last_group_then_the_final_pool():
    """METHOD 4: the 5 blocks of block3, relu1 (its input's BN + ReLU) and relu2 of each, then the pooled
    ReLU(final BN) the classifier reads: 11 taps. Checked on a WRN-34-1 (the same structure, 10x narrower)."""
    from engine.models.wrn import WideResNet

    torch.manual_seed(0)
    m = WideResNet(10, depth=34, widen=1).eval()
    names = [f"block3.layer.{i}.bn{j}" for i in range(5) for j in (1, 2)] + ["bn1"]
    seen, hooks = bn_outputs(m, names)
    logits, taps = m(torch.rand(2, 3, 32, 32), bn="adv", features=True)
    for h in hooks:
        h.remove()
    assert [t.shape[1] for t in taps] == [32] + [64] * 10 == m.feature_dims
    assert all(torch.equal(t, seen[n].mean(dim=(2, 3))) for t, n in zip(taps, names, strict=True))
    assert torch.equal(logits, m.fc(taps[-1]))


def test_wrn_initialisation_is_trades_s():
    """He-normal by fan-out (k * k * out_channels) for every convolution, BN 1/0, the classifier's bias 0."""
    from engine.models.wrn import WideResNet

    torch.manual_seed(0)
    m = WideResNet(10, depth=34, widen=2, split_bn=False)
    for name, conv in ((n, c) for n, c in m.named_modules() if isinstance(c, torch.nn.Conv2d)):
        k, out = conv.kernel_size[0], conv.out_channels
        assert conv.weight.std().item() == pytest.approx((2 / (k * k * out)) ** 0.5, rel=0.2), name
    assert torch.equal(m.fc.bias, torch.zeros_like(m.fc.bias))
    assert all(
        torch.equal(b.weight, torch.ones_like(b.weight)) for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d)
    )


def test_a_trades_wrn_checkpoint_with_its_unused_sub_block1_loads():
    """TRADES's WideResNet builds a `sub_block1` it never calls; its released checkpoints carry those keys. They
    are dropped (the function is the same); any other unexpected key is still refused."""
    from engine.models import CheckpointError
    from engine.models.wrn import Group

    torch.manual_seed(0)
    state = dict(build_model(ModelConfig(arch="wrn34-10", split_bn=False), 10).state_dict())  # the checkpoint's
    m = build_model(ModelConfig(arch="wrn34-10", split_bn=False), 10)  # other initial weights
    extra = {f"sub_block1.{k}": v for k, v in Group(5, 16, 160, 1, split_bn=False).state_dict().items()}
    load_plain(m, state | extra, "trades.pt")
    loaded = m.state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], v) for k, v in state.items())
    with pytest.raises(CheckpointError, match="unexpected"):
        load_plain(m, state | {"other.weight": torch.zeros(1)}, "other.pt")


def test_branch_routing_uses_only_that_bn():
    torch.manual_seed(0)
    m = build_model(ModelConfig(width=8), 10).train()
    x = torch.rand(6, 3, 32, 32)
    m(x, bn="clean").sum().backward()
    assert m.bn1.clean.weight.grad is not None and m.bn1.adv.weight.grad is None
    assert m.bn1.adv.num_batches_tracked == 0 and m.bn1.clean.num_batches_tracked == 1


def dual_and_two_passes(dtype, probe=False):
    """(dual-pass model, two-pass twin) after one forward + backward of the same batch, in `dtype`."""
    torch.manual_seed(0)
    m = build_model(ModelConfig(width=8), 10).train().to(dtype)
    twin = build_model(ModelConfig(width=8), 10).train().to(dtype)
    twin.load_state_dict(m.state_dict())
    xc, xa = torch.rand(5, 3, 32, 32).to(dtype), torch.rand(5, 3, 32, 32).to(dtype)
    if probe:
        xc, xa = perturbed(xc), perturbed(xa)
    logits, _ = m(torch.cat([xc, xa]), bn="dual", features=True)
    lc, la = twin(xc, bn="clean"), twin(xa, bn="adv")
    (logits[:5].square().sum() + logits[5:].sum()).backward()
    (lc.square().sum() + la.sum()).backward()
    return (m, logits), (twin, torch.cat([lc, la]))


def test_dual_pass_equals_two_passes():
    """The reference is the two-pass model in float64: a wrong dual pass is then O(1) away from it, not only from
    its own float64 self."""
    (dual, logits), (plain, plain_logits) = dual_and_two_passes(torch.float32)
    _, (ref, ref_logits) = dual_and_two_passes(torch.float64)
    _, (probe, probe_logits) = dual_and_two_passes(torch.float64, probe=True)
    assert_near_reference("logits", logits, plain_logits, ref_logits, probe_logits, floor=1e-5)
    named = zip(dual.named_parameters(), plain.parameters(), ref.parameters(), probe.parameters(), strict=True)
    for (name, p), q, r, s in named:
        assert_near_reference(f"{name} gradient", p.grad, q.grad, r.grad, s.grad, floor=1e-5)
    buffers = zip(dual.named_buffers(), plain.buffers(), ref.buffers(), probe.buffers(), strict=True)
    for (name, b), c, r, s in buffers:
        if b.is_floating_point():
            assert_near_reference(name, b, c, r, s, floor=1e-4)  # running means near 0: rounding is relative to std
        else:
            assert torch.equal(b, c), name


def test_an_unknown_branch_is_refused_not_read_as_clean():
    """Any bn= other than adv, clean or dual used to run the clean BNs (training-only): a typo would have evaluated
    the wrong branch without a word."""
    for split_bn in (True, False):  # single-BN networks (AT, TRADES, ...) ran a typo as adv
        m = build_model(ModelConfig(width=8, split_bn=split_bn), 10).eval()
        with pytest.raises(ValueError, match="bn='robust': expected one of"):
            m(torch.rand(2, 3, 32, 32), bn="robust")


def test_export_of_a_wrapped_checkpoint_writes_plain_keys(tmp_path, capsys):
    """A DDP- or compile-wrapped state_dict (module. / _orig_mod. prefixes) exports to a file a plain network
    loads, as engine.hub reads it."""
    from engine.cli import main

    state = build_model(ModelConfig(width=8), 10).state_dict()
    torch.save({f"module._orig_mod.{k}": v for k, v in state.items()}, tmp_path / "wrapped.pt")
    assert main(["export", str(tmp_path / "wrapped.pt"), str(tmp_path / "plain.pt")]) == 0
    plain = torch.load(tmp_path / "plain.pt")
    assert plain and not any(k.startswith(("module.", "_orig_mod.")) for k in plain)
    load_plain(build_model(ModelConfig(width=8), 10, split_bn=False), plain, "test")


def test_export_equals_adv_branch():
    torch.manual_seed(0)
    m = build_model(ModelConfig(width=8), 10)
    m.train()
    for _ in range(3):  # make clean and adv statistics differ
        m(torch.rand(8, 3, 32, 32), bn="clean")
        m(torch.rand(8, 3, 32, 32) * 0.5, bn="adv")
    plain = build_model(ModelConfig(width=8), 10, split_bn=False)
    load_plain(plain, export_state_dict(m.state_dict()), "test")
    x = torch.rand(4, 3, 32, 32)
    m.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), m(x, bn="adv"))
        assert not torch.allclose(plain(x), m(x, bn="clean"))
