import importlib

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


@pytest.mark.parametrize("objective", ["ce", "kl"])
@pytest.mark.parametrize("start", ["uniform", "gaussian", "none"])
@pytest.mark.parametrize("train", [True, False])
def test_pgd_invariants(model, start, train, objective):
    """Cross-entropy on labels (AT, MART, AR-AT) and KL to a target distribution without labels (TRADES, LBGAT)."""
    x, y, target = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,)), None
    if objective == "kl":
        model.eval()
        with torch.no_grad():
            target = model(x).softmax(1)  # (B, classes)
        model.train()
        y, target_before = None, target.clone()
    x_before, y_before = x.clone(), None if y is None else y.clone()
    params_before = [p.detach().clone() for p in model.parameters()]
    buffers_before = {k: b.clone() for k, b in model.named_buffers()}
    x_adv = pgd(model, x, y, AttackConfig(num_steps=3, start=start), bn="adv", train=train, target_probs=target)
    if not train:  # eval mode: running statistics used, none moved, no batch counted
        assert all(torch.equal(b, buffers_before[k]) for k, b in model.named_buffers())
    else:
        assert not torch.equal(model.bn1.adv.running_mean, buffers_before["bn1.adv.running_mean"])
    assert torch.equal(x, x_before)  # inputs unchanged
    assert torch.equal(target, target_before) if y is None else torch.equal(y, y_before)
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert all(p.grad is None for p in model.parameters())  # no parameter gradient
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params_before, strict=True))
    assert model.training  # caller's mode restored
    if not (objective == "kl" and start == "none" and not train):  # x itself is the KL's minimum: no gradient
        assert not torch.equal(x_adv, x)


def test_the_uniform_start_fills_the_eps_ball_on_both_sides():
    """random start U(-eps, eps) per pixel (then [0, 1]): both signs, reaching near both bounds, mean ~0."""
    from engine.attacks.pgd import random_start

    torch.manual_seed(0)
    x = torch.full((64, 3, 32, 32), 0.5)  # interior: no clamp to [0, 1]
    d = random_start(x, EPS, "uniform") - x
    assert d.abs().max() <= EPS + 1e-7 and d.min() < -0.99 * EPS and d.max() > 0.99 * EPS
    assert abs(d.mean().item()) < 0.01 * EPS and (d > 0).float().mean().item() == pytest.approx(0.5, abs=0.01)


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
    kls = []
    for steps in (0, 3):  # the Gaussian start alone, then 3 steps from the same start
        torch.manual_seed(0)
        x_adv = pgd(model, x, None, AttackConfig(num_steps=steps, start="gaussian"), bn="adv", train=False,
                    target_probs=p)  # fmt: skip
        with torch.no_grad():
            kls.append(torch.nn.functional.kl_div(model(x_adv).log_softmax(1), p, reduction="sum"))
    assert kls[1] > 10 * kls[0] and (x_adv - x).abs().max() <= EPS + 1e-6
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


def confident_model():
    """A network as confident as a trained one on its training data (class 0 by a logit margin of ~12): its input
    gradients (~1e-9) fall below fp16's smallest subnormal (6e-8) unless the attack loss is scaled."""
    torch.manual_seed(1)
    m = build_model(ModelConfig(width=8), 10).eval()
    with torch.no_grad():
        m.linear.bias.zero_()[0] = 12.0
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def sign_agreement(grad, reference):
    return (grad.sign() == reference.sign()).float().mean().item()


def test_fp16_attack_gradient_signs_agree_with_fp32(monkeypatch):
    pgd_module = importlib.import_module("engine.attacks.pgd")  # the module (engine.attacks.pgd is the function)

    m = confident_model()
    x, y = torch.rand(16, 3, 32, 32), torch.zeros(16, dtype=torch.long)  # correctly classified, confidently

    def fp16():
        return torch.autocast("cpu", dtype=torch.float16)

    reference = pgd_module.input_gradient(m, x, y, "adv", None, None)  # fp32
    scaled = pgd_module.input_gradient(m, x, y, "adv", None, fp16)
    monkeypatch.setattr(pgd_module, "fp16_gradient_scale", lambda *a, **k: 1.0)
    unscaled = pgd_module.input_gradient(m, x, y, "adv", None, fp16)
    zeros_unscaled, zeros_scaled = (unscaled == 0).float().mean().item(), (scaled == 0).float().mean().item()
    agree_unscaled, agree_scaled = sign_agreement(unscaled, reference), sign_agreement(scaled, reference)
    assert zeros_unscaled > 0.5, f"the case must underflow unscaled (zeros {zeros_unscaled:.3f})"
    assert zeros_scaled < 0.01 and torch.isfinite(scaled).all(), f"zeros with the scale: {zeros_scaled:.4f}"
    assert agree_scaled > 0.9 and agree_scaled > agree_unscaled + 0.4, (agree_scaled, agree_unscaled)


def test_an_eval_mode_fp16_attack_scales_each_image_so_a_misclassified_one_leaves_the_others_their_gradient():
    """helper-89: one scale for the batch, set by its worst-classified image (2^8), left a confident image's input
    gradient underflowing in fp16 (sign 0: no step). In eval mode images do not interact: each gets its own power
    of two. (Train mode keeps one scale: batch norm mixes every image's loss into each gradient.)"""
    pgd_module = importlib.import_module("engine.attacks.pgd")
    m = confident_model()
    x, y = torch.rand(16, 3, 32, 32), torch.zeros(16, dtype=torch.long)
    y[0] = 1  # image 0 misclassified: its logit gradient is ~1

    def fp16():
        return torch.autocast("cpu", dtype=torch.float16)

    reference = pgd_module.input_gradient(m, x, y, "adv", None, None)[1:]  # fp32, the confident images
    scaled = pgd_module.input_gradient(m, x, y, "adv", None, fp16)[1:]
    assert (scaled == 0).float().mean().item() < 0.01 and torch.isfinite(scaled).all()
    assert sign_agreement(scaled, reference) > 0.9


def test_fp16_gradient_scale_is_a_power_of_two_bounding_the_logit_gradient():
    from engine.attacks.pgd import fp16_gradient_scale

    logits = torch.tensor([[30.0, 0.0, -5.0], [0.0, 0.0, 0.0]])
    scale = fp16_gradient_scale(logits, torch.tensor([0, 1]), None)
    largest = (torch.softmax(logits, 1) - torch.eye(3)[[0, 1]]).abs().max()  # row 1's: 1 - 1/3
    assert scale.item() == 2.0**8 and 2**7 <= largest * scale <= 2**8
    # one per image: row 0 is confident (its gap ~ exp(-30) ~ 2^-43.3, lifted to 2^7..2^8 by 2^51); row 1 as above
    per_image = fp16_gradient_scale(logits, torch.tensor([0, 1]), None, per_image=True)
    assert per_image.tolist() == [2.0**51, 2.0**8]
    gaps = (torch.softmax(logits, 1) - torch.eye(3)[[0, 1]]).abs().amax(1)
    lifted = gaps * per_image
    assert ((lifted >= 2**7) & (lifted <= 2**8)).all()


def test_gaussian_start_is_not_clamped_as_in_the_published_codes():
    from engine.attacks.step import random_start

    torch.manual_seed(0)
    x = torch.zeros(2, 3, 8, 8)
    start = random_start(x, EPS, "gaussian")
    assert start.min() < 0 and (start - x).abs().max() < 0.01  # below 0 where the noise is negative
    assert random_start(x, EPS, "uniform").min() >= 0


class OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts casts of the network's weights and which gradients each convolution backward computes."""

    def __init__(self, weights):
        super().__init__()
        self.weights = {id(w) for w in weights}
        self.weight_casts, self.weight_grads, self.input_grads = 0, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and id(args[0]) in self.weights:
            self.weight_casts += 1
        if func is torch.ops.aten.convolution_backward.default:
            self.input_grads += bool(args[-1][0])  # output_mask: (input, weight, bias)
            self.weight_grads += bool(args[-1][1])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("steps", [1, 3])
def test_an_eager_attack_casts_each_weight_once_and_computes_no_weight_gradient(steps):
    """Issue 9 item 4: autocast is entered once around the attack, whose weights keep requiring grad, so autocast's
    cast cache serves every forward after the first; autograd.grad(loss, x_adv) still computes no weight gradient."""
    torch.manual_seed(0)
    net = build_model(ModelConfig(width=8), 10)
    convs = [m.weight for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    with OpCounter(convs) as counter:
        pgd(net, x, y, AttackConfig(num_steps=steps), bn="adv", train=False,
            autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))  # fmt: skip
    assert counter.weight_casts == len(convs), f"{counter.weight_casts} casts of {len(convs)} conv weights"
    assert counter.input_grads == len(convs) * steps and counter.weight_grads == 0  # every backward seen: input only
    assert all(p.grad is None and p.requires_grad for p in net.parameters())
