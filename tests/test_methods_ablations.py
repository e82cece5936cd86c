"""The seed's ablation rows (METHOD 5) are AR-AT with switches: which recipe sets which, and where the invariance
gradient flows in each."""

import copy
import dataclasses

import pytest
import torch
from test_methods import labels_told_apart

from engine.config import apply_overrides
from engine.methods import Nets, build_method
from engine.methods.arat import forward_pair
from engine.models import build_model
from engine.perf import Perf
from engine.recipes import get_recipe

NO_AMP = Perf(torch.device("cpu"), torch.float32, False, False, "off").autocast
ROWS = {  # recipe variant -> (split_bn, stop_grad, predictor)
    "v0": (False, False, False),
    "stopgrad": (False, True, True),
    "splitbn": (True, False, False),
    "arat": (True, True, True),
}


@pytest.mark.parametrize("arch", ["resnet18", "wrn34-10"])
@pytest.mark.parametrize("variant", list(ROWS))
def test_ablation_recipes_set_the_switches(variant, arch):
    cfg = get_recipe(f"ablation-{variant}-{arch}-cifar10")
    assert (cfg.model.split_bn, cfg.method.stop_grad, cfg.method.predictor) == ROWS[variant]
    assert cfg.method.name == "arat" and cfg.data.dataset == "cifar10"
    full = get_recipe(f"arat-{arch}-cifar10")  # everything else is AR-AT's

    def strip(c):  # the three switches (and the names) set to AR-AT's; nothing else touched
        model = dataclasses.replace(c.model, split_bn=full.model.split_bn)
        method = dataclasses.replace(c.method, stop_grad=full.method.stop_grad, predictor=full.method.predictor)
        return dataclasses.replace(c, recipe="", description="", model=model, method=method, analysis=full.analysis)

    assert strip(cfg) == strip(full)
    assert cfg.analysis.grad_sim and not full.analysis.grad_sim  # the seed's ablation table has a grad-sim column


def setup(tiny_cfg, variant):
    split_bn, stop_grad, predictor = ROWS[variant]
    overrides = [f"model.split_bn={split_bn}", f"method.stop_grad={stop_grad}", f"method.predictor={predictor}"]
    cfg = apply_overrides(tiny_cfg, ["perf.dtype=fp32", "perf.channels_last=false", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg.model, 10)
    return cfg, model, build_method(cfg, model)


@pytest.mark.parametrize("variant", list(ROWS))
def test_invariance_gradient_reaches_the_clean_side_only_without_stop_grad(tiny_cfg, variant):
    _, model, method = setup(tiny_cfg, variant)
    torch.manual_seed(1)
    feats_a = [torch.randn(4, d, requires_grad=True) for d in model.feature_dims]
    feats_c = [torch.randn(4, d, requires_grad=True) for d in model.feature_dims]
    method.invariance(feats_a, feats_c).backward()
    assert all(f.grad.abs().max() > 0 for f in feats_a)
    if method.cfg.method.stop_grad:
        assert all(f.grad is None for f in feats_c)
    else:
        assert all(f.grad.abs().max() > 0 for f in feats_c)


def weight_grads(model, loss):
    params = [p for n, p in model.named_parameters() if "conv" in n]
    return torch.autograd.grad(loss, params, retain_graph=True)


@pytest.mark.parametrize("variant", ["v0", "splitbn"])
def test_symmetric_distance_is_both_one_sided_halves(tiny_cfg, variant):
    """Dist(z', z) with gradient into both sides = Dist(z', sg(z)) + Dist(sg(z'), z), gradient-wise."""
    _, model, method = setup(tiny_cfg, variant)
    x, x_adv = torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32)
    (_, fc), (_, fa) = forward_pair(model, x, x_adv, dual=True, features=True)
    full = method.invariance(fa, fc)  # symmetric "full": Dist(z', z)
    both = weight_grads(model, full)
    adv_side = weight_grads(model, method.invariance(fa, [f.detach() for f in fc]))
    clean_side = weight_grads(model, method.invariance([f.detach() for f in fa], fc))
    for g, a, c in zip(both, adv_side, clean_side, strict=True):
        torch.testing.assert_close(g, a + c, rtol=1e-4, atol=1e-4 * g.abs().max().item())
    assert any(c.abs().max() > 0 for c in clean_side)
    method.cfg.method.symmetric = "average"  # the poster's (Dist(z', sg(z)) + Dist(sg(z'), z)) / 2
    torch.testing.assert_close(method.invariance(fa, fc), full)  # the same value, half of each side's gradient
    for g, a, c in zip(weight_grads(model, method.invariance(fa, fc)), adv_side, clean_side, strict=True):
        torch.testing.assert_close(g, (a + c) / 2, rtol=1e-4, atol=1e-4 * g.abs().max().item())


@pytest.mark.parametrize("variant", ["stopgrad", "arat"])
def test_stop_grad_rows_take_no_gradient_through_the_clean_branch(tiny_cfg, variant):
    _, model, method = setup(tiny_cfg, variant)
    x, x_adv = torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32)
    (_, fc), (_, fa) = forward_pair(model, x, x_adv, dual=True, features=True)
    got = weight_grads(model, method.invariance(fa, fc))
    expected = weight_grads(model, method.invariance(fa, [f.detach() for f in fc]))
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)


def test_single_bn_normalizes_each_half_with_its_own_batch_statistics(tiny_cfg):
    cfg, model, _ = setup(tiny_cfg, "v0")
    x, x_adv = torch.rand(4, 3, 32, 32), 0.5 * torch.rand(4, 3, 32, 32)
    separate = copy.deepcopy(model)
    (lc, _), (la, _) = forward_pair(model, x, x_adv, dual=True, features=True)
    torch.testing.assert_close(lc, separate(x, bn="clean"), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(la, separate(x_adv, bn="adv"), rtol=1e-4, atol=1e-5)
    joint = copy.deepcopy(model)(torch.cat([x, x_adv]), bn="adv")  # one batch: mixed statistics, not what runs
    assert not torch.allclose(joint[4:], la, atol=1e-3)


def test_single_bn_ablation_step_and_auto_balance(tiny_cfg):
    """V0: the attack and the clean branch go through the one BN; auto-balance reads that BN in eval mode."""
    _, model, method = setup(tiny_cfg, "v0")
    nets = Nets(model, model, model)
    x = torch.rand(16, 3, 32, 32)
    y = labels_told_apart(model, x, "single")
    model.train()
    assert method.on_epoch_start(nets, [(x, y)], NO_AMP, 1)["adv_weight"] == 0.75
    assert method.predictors is None
    out = method.step(nets, x, y, NO_AMP)
    assert set(out.terms) == {"cls", "inv"} and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.bn1.weight.grad.abs().max() > 0


def test_ablation_bn_layout(tiny_cfg):
    for variant, (split_bn, *_) in ROWS.items():
        _, model, _ = setup(tiny_cfg, variant)
        names = [n for n, _ in model.named_parameters()]
        assert any(".clean." in n for n in names) is split_bn
