"""The baselines' losses (METHOD 6) against hand computations on small cases, and each step against a
re-computation from its parts with the same attack randomness."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from method_cases import method_case as setup

from engine.attacks import pgd
from engine.config import apply_overrides
from engine.methods import build_method
from engine.methods.mart import boosted_ce, weighted_kl
from engine.methods.trades import trades_kl
from engine.models import build_model
from engine.perf import Perf

NO_AMP = Perf(torch.device("cpu"), torch.float32, False, False, "off").autocast


def batch(n=6):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


LOGITS_C = [[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]]
LOGITS_A = [[0.5, 1.5, -0.5], [1.0, -1.0, 2.0]]
Y = [0, 1]


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


def test_trades_kl_direction_and_batchmean():
    rows = list(zip(LOGITS_C, LOGITS_A, strict=True))
    forward = sum(kl(softmax(c), softmax(a)) for c, a in rows)
    reverse = sum(kl(softmax(a), softmax(c)) for c, a in rows)
    got = trades_kl(torch.tensor(LOGITS_C), torch.tensor(LOGITS_A)).item()
    assert got == pytest.approx(forward / 2, rel=1e-5)  # KL(p(x) || p(x')), summed over classes, mean over the batch
    assert abs(reverse / 2 - got) > 1e-2 and abs(forward / 6 - got) > 1e-2  # not reversed, not an elementwise mean


def test_mart_terms_by_hand():
    bce, wkl = 0.0, 0.0
    for c, a, y in zip(LOGITS_C, LOGITS_A, Y, strict=True):
        pc, pa = softmax(c), softmax(a)
        runner_up = max(p for k, p in enumerate(pa) if k != y)
        bce += -math.log(pa[y]) - math.log(1.0001 - runner_up)
        wkl += kl(pc, pa) * (1 - pc[y])
    lc, la, y = torch.tensor(LOGITS_C), torch.tensor(LOGITS_A), torch.tensor(Y)
    assert boosted_ce(la, y).item() == pytest.approx(bce / 2, rel=1e-5)
    assert weighted_kl(lc, la, y).item() == pytest.approx(wkl / 2, rel=1e-5)


def test_mart_margin_constant_bounds_the_boost():
    # the runner-up class takes (almost) all the mass: -log(1.0001 - p) stays finite, ~ -log(1e-4)
    la, y = torch.tensor([[0.0, 40.0, 0.0]]), torch.tensor([0])
    p_runner_up = F.softmax(la, dim=1)[0, 1].item()
    expected = F.cross_entropy(la, y).item() - math.log(1.0001 - p_runner_up)
    assert boosted_ce(la, y).item() == pytest.approx(expected, rel=1e-5)
    assert -math.log(1.0001 - p_runner_up) == pytest.approx(-math.log(1e-4), rel=1e-3)


def test_trades_step_by_hand(tiny_cfg):
    cfg, model, method, nets = setup(tiny_cfg, "trades", "attack.start=gaussian", "method.beta=6")
    ref = copy.deepcopy(model)
    x, y = batch()
    torch.manual_seed(5)
    out = method.step(nets, x, y, NO_AMP)  # dual forward (one pass, per-half BN statistics)
    assert model.training  # the step's attack ran in eval mode and left the network training
    ref.eval()
    with torch.no_grad():
        target = F.softmax(ref(x), dim=1)

    def kl(net, x_adv):
        lc, la = net(x), net(x_adv)  # two separate passes, train mode
        return (F.softmax(lc, 1) * (F.log_softmax(lc, 1) - F.log_softmax(la, 1))).sum() / len(y)

    ref.train()
    train_mode = attacked_in_the_other_mode(ref, x, y, cfg, True, kl, target_probs=target)
    ref.eval()
    torch.manual_seed(5)
    x_adv = pgd(ref, x, y, cfg.attack, bn="adv", train=False, target_probs=target)
    ref.train()
    torch.testing.assert_close(out.terms["cls"], F.cross_entropy(ref(x), y), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.terms["inv"], 6 * kl(ref, x_adv), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(out.terms["inv"], 6 * train_mode, rtol=1e-3, atol=1e-5)  # a train-mode attack's KL


def attacked_in_the_other_mode(ref, x, y, cfg, train: bool, loss, **attack) -> torch.Tensor:
    """loss(network, x~) on the same attack (same randomness) run with BN in the other mode, on a copy taken before
    ref's own forwards: a test that names the attack's mode must be able to tell the two apart."""
    twin = copy.deepcopy(ref)
    torch.manual_seed(5)
    x_other = pgd(twin, x, y, cfg.attack, bn="adv", train=train, **attack)
    assert not torch.equal(x_other, x)
    return loss(twin, x_other)


def test_mart_step_attacks_in_eval_mode(tiny_cfg):
    cfg, model, method, nets = setup(tiny_cfg, "mart", "attack.start=gaussian", "method.beta=5")
    ref = copy.deepcopy(model)
    x, y = batch()
    torch.manual_seed(5)
    out = method.step(nets, x, y, NO_AMP)
    train_mode = attacked_in_the_other_mode(ref, x, y, cfg, True, lambda net, xa: boosted_ce(net(xa), y))
    torch.manual_seed(5)
    x_adv = pgd(ref, x, y, cfg.attack, bn="adv", train=False)
    lc, la = ref(x), ref(x_adv)
    torch.testing.assert_close(out.terms["cls"], boosted_ce(la, y), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.terms["inv"], 5 * weighted_kl(lc, la, y), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(out.terms["cls"], train_mode, rtol=1e-3, atol=1e-4)  # a train-mode attack: another loss


def test_at_step_attacks_in_train_mode(tiny_cfg):
    cfg, model, method, nets = setup(tiny_cfg, "at")
    ref = copy.deepcopy(model)
    x, y = batch()
    torch.manual_seed(5)
    out = method.step(nets, x, y, NO_AMP)
    eval_mode = attacked_in_the_other_mode(ref, x, y, cfg, False, lambda net, xa: F.cross_entropy(net(xa), y))
    torch.manual_seed(5)
    x_adv = pgd(ref, x, y, cfg.attack, bn="adv", train=True)
    torch.testing.assert_close(out.terms["cls"], F.cross_entropy(ref(x_adv), y), rtol=1e-4, atol=1e-5)
    assert set(out.terms) == {"cls"} and set(out.sums) == {"correct_adv"}
    assert not torch.allclose(out.terms["cls"], eval_mode, rtol=1e-3, atol=1e-4)  # an eval-mode attack: another loss


def test_std_step_is_clean_cross_entropy(tiny_cfg):
    _, model, method, nets = setup(tiny_cfg, "std")
    ref = copy.deepcopy(model)
    x, y = batch()
    out = method.step(nets, x, y, NO_AMP)
    torch.testing.assert_close(out.terms["cls"], F.cross_entropy(ref(x), y), rtol=1e-5, atol=1e-6)


def test_lbgat_mse_to_the_jointly_trained_clean_model(tiny_cfg):
    cfg, model, method, nets = setup(tiny_cfg, "lbgat", "attack.start=gaussian", "method.beta=0")
    g = method.clean_model
    assert sum(1 for k in method.state_dict() if k.startswith("clean_model.")) > 0  # checkpointed with the method
    assert all(p.requires_grad for p in g.parameters())  # and trained (build_run optimizes method.parameters())
    ref, ref_g = copy.deepcopy(model), copy.deepcopy(g)
    x, y = batch()
    torch.manual_seed(5)
    out = method.step(nets, x, y, NO_AMP)
    torch.manual_seed(5)
    ref.eval()
    with torch.no_grad():
        target = F.softmax(ref(x), dim=1)
    x_adv = pgd(ref, x, y, cfg.attack, bn="adv", train=False, target_probs=target)
    ref.train()
    la, lg = ref(x_adv), ref_g(x)
    torch.testing.assert_close(out.terms["inv"], ((la - lg) ** 2).mean(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.terms["cls"], F.cross_entropy(lg, y), rtol=1e-4, atol=1e-6)
    # the MSE reaches both networks; the clean model's CE only the clean model
    out.terms["cls"].backward(retain_graph=True)
    assert all(p.grad is None for p in model.parameters())
    assert g.linear.weight.grad.abs().max() > 0
    g.zero_grad()
    out.terms["inv"].backward()
    assert model.linear.weight.grad.abs().max() > 0 and g.linear.weight.grad.abs().max() > 0


def test_lbgat_beta_adds_the_trades_kl(tiny_cfg):
    _, model, method, nets = setup(tiny_cfg, "lbgat", "method.beta=0")
    x, y = batch()
    torch.manual_seed(5)
    without = method.step(nets, x, y, NO_AMP).terms["inv"]
    _, model, method, nets = setup(tiny_cfg, "lbgat", "method.beta=2")
    torch.manual_seed(5)
    with_kl = method.step(nets, x, y, NO_AMP).terms["inv"]
    assert with_kl.item() > without.item()  # KL >= 0, the rest unchanged up to BN batch statistics


def test_single_bn_methods_refuse_split_bn(tiny_cfg):
    from engine.config import ConfigError

    cfg = apply_overrides(tiny_cfg, ["method.name=trades", "model.split_bn=true"])
    with pytest.raises(ConfigError, match="model.split_bn=false"):
        build_method(cfg, build_model(cfg.model, 10))


def bn_buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def bn_statistics_after(ref, inputs):
    """`ref`'s BN buffers after train-mode forwards of `inputs`, in that order."""
    ref.train()
    with torch.no_grad():
        for x in inputs:
            ref(x, bn="adv")
    return bn_buffers(ref)


def assert_bn_statistics_of(model, ref, inputs, not_after=None):
    """`model`'s BN buffers are those of `ref` after train-mode forwards of `inputs`, in that order; with
    `not_after` ((a copy of ref, other inputs)), they are told apart from those the other forwards give."""
    got, want = bn_buffers(model), bn_statistics_after(ref, inputs)
    assert got.keys() == want.keys() and got
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    if not_after is not None:
        other = bn_statistics_after(*not_after)
        assert any(not torch.allclose(got[k], other[k], rtol=1e-5, atol=1e-6) for k in other), "orders look alike"


def fixed_adversary(x):
    g = torch.Generator().manual_seed(3)
    return (x + 8 / 255 * torch.empty_like(x).uniform_(-1, 1, generator=g)).clamp(0, 1)


@pytest.mark.parametrize("published", [True, False])
def test_trades_bn_statistics_follow_the_published_forwards(tiny_cfg, monkeypatch, published):
    """The published TRADES code runs f(x), f(x'), f(x) in train mode: its running statistics are updated clean,
    adv, clean; with published_bn_updates off, once per half (clean, adv)."""
    _, model, method, nets = setup(tiny_cfg, "trades", f"method.published_bn_updates={str(published).lower()}")
    x, y = batch()
    x_adv = fixed_adversary(x)
    monkeypatch.setattr("engine.methods.trades.trades_attack", lambda *a, **k: x_adv)
    ref, other = copy.deepcopy(model), copy.deepcopy(model)
    method.step(nets, x, y, NO_AMP)
    inputs, wrong = ([x, x_adv, x], [x, x, x_adv]) if published else ([x, x_adv], [x_adv, x])
    assert_bn_statistics_of(model, ref, inputs, (other, wrong))  # the order shows: the wrong one is told apart
    assert model.bn1.num_batches_tracked.item() == (3 if published else 2)


@pytest.mark.parametrize(
    ("beta", "published", "order"),
    [(0, True, "ac"), (0, False, "a"), (2, True, "ac"), (2, False, "ca")],
)
def test_lbgat_bn_statistics_follow_the_published_forwards(tiny_cfg, monkeypatch, beta, published, order):
    """The published LBGAT code runs f(x') then f(x) in train mode, also at beta 0 (its f(x) feeds a KL weighted 0):
    f's running statistics are updated adv, clean."""
    overrides = [f"method.beta={beta}", f"method.published_bn_updates={str(published).lower()}"]
    _, model, method, nets = setup(tiny_cfg, "lbgat", *overrides)
    x, y = batch()
    x_adv = fixed_adversary(x)
    monkeypatch.setattr("engine.methods.lbgat.trades_attack", lambda *a, **k: x_adv)
    ref, other = copy.deepcopy(model), copy.deepcopy(model)
    out = method.step(nets, x, y, NO_AMP)
    inputs = [{"a": x_adv, "c": x}[k] for k in order]
    assert_bn_statistics_of(model, ref, inputs, (other, inputs[::-1]) if len(inputs) == 2 else None)
    ref.train()
    torch.testing.assert_close(out.terms["inv"].detach(), published_lbgat_inv(ref, method, x, x_adv, beta))


def published_lbgat_inv(ref, method, x, x_adv, beta):
    """MSE(f(x'), g(x)) + beta KL(p_f(x) || p_f(x')) from fresh copies (train mode, the same batch statistics)."""
    f, g = copy.deepcopy(ref), copy.deepcopy(method.clean_model)
    with torch.no_grad():
        la, lc, lg = f(x_adv, bn="adv"), f(x, bn="adv"), g(x)
    return F.mse_loss(la, lg) + beta * trades_kl(lc, la)
