import pytest
import torch
from precision import assert_near_reference, perturbed

from engine.config import ModelConfig
from engine.models import build_model, export_state_dict, load_plain


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_parameter_counts_match_method():
    assert n_params(build_model(ModelConfig(split_bn=False), 10)) == pytest.approx(11.17e6, rel=1e-3)
    assert n_params(build_model(ModelConfig(arch="wrn34-10", split_bn=False), 10)) == pytest.approx(46.16e6, rel=1e-3)


def test_feature_taps():
    x = torch.rand(4, 3, 32, 32)
    logits, feats = build_model(ModelConfig(width=8), 10)(x, bn="adv", features=True)
    assert logits.shape == (4, 10) and [f.shape for f in feats] == [(4, 64)] * 4
    assert all((f >= 0).all() for f in feats)  # z = GAP(ReLU(.))


def test_wrn_taps_shape():
    m = build_model(ModelConfig(arch="wrn34-10"), 10)
    assert m.feature_dims == [320] + [640] * 10


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
    m = build_model(ModelConfig(width=8), 10).eval()
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
