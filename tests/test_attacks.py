import pytest
import torch

from engine.attacks import pgd, pgd_step
from engine.attacks.step import pgd_step_reference
from engine.config import AttackConfig, ModelConfig
from engine.models import build_model

EPS = 8 / 255


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(ModelConfig(width=8), 10)


@pytest.mark.parametrize("start", ["uniform", "gaussian", "none"])
@pytest.mark.parametrize("train", [True, False])
def test_pgd_invariants(model, start, train):
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    x_before = x.clone()
    params_before = [p.detach().clone() for p in model.parameters()]
    x_adv = pgd(model, x, y, AttackConfig(num_steps=3, start=start), bn="adv", train=train)
    assert torch.equal(x, x_before)  # input unchanged
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert all(p.grad is None for p in model.parameters())  # no parameter gradient
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params_before, strict=True))
    assert model.training  # caller's mode restored
    assert not torch.equal(x_adv, x)


def test_train_mode_attack_updates_only_adv_running_stats(model):
    tracked = model.bn1.adv.num_batches_tracked.clone(), model.bn1.clean.num_batches_tracked.clone()
    pgd(
        model,
        torch.rand(4, 3, 32, 32),
        torch.zeros(4, dtype=torch.long),
        AttackConfig(num_steps=2),
        bn="adv",
        train=True,
    )
    assert model.bn1.adv.num_batches_tracked == tracked[0] + 2
    assert model.bn1.clean.num_batches_tracked == tracked[1]


def test_pgd_increases_loss(model):
    torch.manual_seed(1)
    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
    model.eval()
    ce = torch.nn.functional.cross_entropy
    with torch.no_grad():
        base = ce(model(x), y)
    x_adv = pgd(model, x, y, AttackConfig(num_steps=5, start="none"), bn="adv", train=False)
    with torch.no_grad():
        assert ce(model(x_adv), y) > base
    model.train()


def test_kl_objective_moves_away_from_target(model):
    x = torch.rand(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        p = model(x).softmax(1)
    x_adv = pgd(model, x, None, AttackConfig(num_steps=3, start="gaussian"), bn="adv", train=False, target_probs=p)
    with torch.no_grad():
        kl = torch.nn.functional.kl_div(model(x_adv).log_softmax(1), p, reduction="sum")
    assert kl > 0 and (x_adv - x).abs().max() <= EPS + 1e-6
    model.train()


def test_step_matches_formula_and_sign_of_zero():
    x = torch.full((5,), 0.5)
    x_adv = torch.tensor([0.5, 0.52, 0.48, 0.999, 0.001])
    grad = torch.tensor([0.0, 1.0, -1.0, 1.0, -1.0])
    out = pgd_step(x, x_adv, grad, eps=0.03, alpha=0.02)
    expected = torch.tensor([0.5, 0.53, 0.47, 0.53, 0.47])  # sign(0) = 0; projected to the eps-ball
    torch.testing.assert_close(out, expected)
    edge = pgd_step_reference(torch.tensor([0.99]), torch.tensor([0.99]), torch.tensor([1.0]), 0.03, 0.02)
    assert edge.item() == 1.0  # clamped to [0, 1]
