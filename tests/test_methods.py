import copy

import pytest
import torch
import torch.nn.functional as F

from engine.config import apply_overrides
from engine.methods import Nets, build_method
from engine.methods.arat import forward_pair
from engine.models import build_model
from engine.perf import Perf

NO_AMP = Perf(torch.device("cpu"), torch.float32, False, False, "off").autocast


def setup(tiny_cfg, *overrides):
    cfg = apply_overrides(tiny_cfg, ["perf.dtype=fp32", "perf.channels_last=false", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg.model, 10)
    method = build_method(cfg, model)
    return cfg, model, method, Nets(model, model, model)


def test_arat_loss_by_hand(tiny_cfg):
    """The step against separate passes by hand, its attack through the adversarial BNs in train mode: the clean
    BNs' parameters are made to differ first (at initialisation both branches compute the same, and an attack
    through the clean BNs passed), and the BN batch counts say which branch ran how often."""
    cfg, model, method, nets = setup(tiny_cfg)
    method.adv_weight = 0.3
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".clean." in name:
                p.mul_(1.5).add_(0.1)
    x, y = torch.rand(6, 3, 32, 32), torch.randint(0, 10, (6,))
    counts = model.bn1.adv.num_batches_tracked.item(), model.bn1.clean.num_batches_tracked.item()
    torch.manual_seed(5)
    out = method.step(nets, x, y, NO_AMP)
    steps = cfg.attack.num_steps
    assert steps > 0 and model.bn1.adv.num_batches_tracked.item() - counts[0] == steps + 1  # attack + training pass
    assert model.bn1.clean.num_batches_tracked.item() - counts[1] == 1  # the training pass only
    # by hand, with the same attack randomness and separate passes
    torch.manual_seed(5)
    from engine.attacks import pgd

    x_adv = pgd(model, x, y, cfg.attack, bn="adv", train=True)
    (lc, fc), (la, fa) = forward_pair(model, x, x_adv, dual=False, features=True)
    cls = 0.3 * F.cross_entropy(la, y) + 0.7 * F.cross_entropy(lc, y)
    inv = sum(1 - F.cosine_similarity(h(a), c, dim=1).mean() for h, a, c in zip(method.predictors, fa, fc, strict=True))
    torch.testing.assert_close(out.terms["cls"], cls, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.terms["inv"], 30.0 / 4 * inv, rtol=1e-4, atol=1e-5)


def test_stop_gradient_keeps_clean_bn_out_of_invariance(tiny_cfg):
    _, model, method, nets = setup(tiny_cfg)
    out = method.step(nets, torch.rand(6, 3, 32, 32), torch.randint(0, 10, (6,)), NO_AMP)
    out.terms["inv"].backward()
    for name, p in model.named_parameters():
        if ".clean." in name:
            assert p.grad is None or p.grad.abs().max() == 0, name
    assert model.bn1.adv.weight.grad.abs().max() > 0
    assert all(p.grad is not None for p in method.predictors.parameters())


def test_without_stop_gradient_clean_bn_gets_invariance_gradient(tiny_cfg):
    _, model, method, nets = setup(tiny_cfg, "method.stop_grad=false")
    method.step(nets, torch.rand(6, 3, 32, 32), torch.randint(0, 10, (6,)), NO_AMP).terms["inv"].backward()
    assert model.bn1.clean.weight.grad.abs().max() > 0


def labels_told_apart(model, x, branch):
    """Labels on which `branch`'s eval-mode accuracy is 3/4, while the other branch in eval mode and `branch` in
    train mode (batch statistics) score otherwise: the accuracy auto-balance reads is then the only one giving 3/4.
    The other branch's running statistics are moved first, so that it predicts differently (a single BN's
    initial statistics already predict otherwise than its batch statistics)."""
    read = "adv" if branch == "single" else branch  # a single BN is called with either branch name
    with torch.no_grad():
        for name, p in model.named_buffers():
            if branch != "single" and branch not in name:
                if "running_mean" in name:
                    p.add_(torch.linspace(-2, 2, p.numel()))
                elif "running_var" in name:
                    p.mul_(torch.linspace(0.1, 10, p.numel()))
        model.eval()
        predicted = model(x, bn=read).argmax(1)
        y = predicted.clone()
        y[-len(y) // 4 :] = (y[-len(y) // 4 :] + 1) % 10
        others = {}
        if branch != "single":
            others["other branch"] = model(x, bn="clean" if branch == "adv" else "adv").argmax(1)
        others["train mode"] = copy.deepcopy(model).train()(x, bn=read).argmax(1)
    for what, pred in others.items():
        assert (pred == y).float().mean().item() != 0.75, f"the test's {what} reading also scores 3/4"
    return y


def test_auto_balance_is_clean_branch_eval_accuracy(tiny_cfg):
    _, model, method, nets = setup(tiny_cfg)
    x = torch.rand(16, 3, 32, 32)
    y = labels_told_apart(model, x, "clean")
    model.train()
    logged = method.on_epoch_start(nets, [(x, y)], NO_AMP)
    assert logged["adv_weight"] == 0.75 and method.adv_weight == 0.75
    assert model.training


def test_official_quirk_switch(tiny_cfg):
    cfg, model, method, nets = setup(tiny_cfg, "attack.official_quirk=true", "attack.num_steps=1")
    from engine.methods.arat import attack_inputs

    x = torch.full((4, 3, 32, 32), 0.5)
    x_clean, x_adv = attack_inputs(nets, x, torch.zeros(4, dtype=torch.long), cfg.attack, NO_AMP)
    assert torch.equal(x, torch.full_like(x, 0.5))  # still no mutation of the caller's batch
    assert 0 < (x_clean - x).abs().max() <= cfg.attack.eps + 1e-6  # the noisy "clean" input
    assert (x_adv - x).abs().max() > cfg.attack.eps  # can leave the eps-ball around x (up to 2 eps)
    assert (x_adv - x_clean).abs().max() <= cfg.attack.eps + 1e-6


def test_invariance_term_on_known_vectors(tiny_cfg):
    _, model, method, _ = setup(tiny_cfg, "method.predictor=false", "method.invariance_weight=8")
    za = [torch.tensor([[1.0, 0.0], [1.0, 1.0]])] * 4
    zc = [torch.tensor([[0.0, 1.0], [2.0, 2.0]])] * 4
    # per layer: mean(1 - cos) = mean(1, 0) = 0.5; lambda / |S| * 4 layers * 0.5 = 8 / 4 * 2 = 4
    assert method.invariance(za, zc).item() == pytest.approx(4.0)


class Recorder(torch.nn.Module):
    """`model`, remembering the inputs of its calls."""

    def __init__(self, model):
        super().__init__()
        self.model, self.inputs = model, []

    def forward(self, x, **kwargs):
        self.inputs.append(x)
        return self.model(x, **kwargs)


@pytest.mark.parametrize("quirk", [True, False])
def test_at_follows_the_official_quirk(tiny_cfg, quirk):
    """The AR-AT code's plain-AT branch attacks with the same in-place PGD: with the quirk, AT's x' starts from the
    noisy x and may leave the eps-ball around x (up to 2 eps); without it, it stays inside."""
    flags = ["method.name=at", "model.split_bn=false", f"attack.official_quirk={str(quirk).lower()}"]
    cfg, model, method, _ = setup(tiny_cfg, *flags, "attack.num_steps=3")
    x, y = torch.full((4, 3, 32, 32), 0.5), torch.zeros(4, dtype=torch.long)
    train = Recorder(model)
    torch.manual_seed(0)
    method.step(Nets(train, model, model), x, y, NO_AMP)
    (x_adv,) = train.inputs
    reach = (x_adv - x).abs().max().item()
    eps = cfg.attack.eps
    assert (eps + 1e-4 < reach <= 2 * eps + 1e-6) if quirk else reach <= eps + 1e-6


@pytest.mark.parametrize("name", ["trades", "mart", "lbgat", "arrest", "std"])
def test_the_official_quirk_is_refused_where_it_means_nothing(tiny_cfg, name):
    from engine.config import ConfigError

    cfg = apply_overrides(tiny_cfg, [f"method.name={name}", "model.split_bn=false", "attack.official_quirk=true"])
    with pytest.raises(ConfigError, match="official_quirk"):
        build_method(cfg, build_model(cfg.model, 10))
