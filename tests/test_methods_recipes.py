"""Every recipe family trains end to end on synthetic data (ResNet-18 at width 8), and takes one step at its real
size on WRN-34-10 (tiny batch of 8x8 images: the real network is too slow for CPU runs)."""

import json

import pytest
import torch

from engine.config import apply_overrides
from engine.methods import Nets, build_method, method_class
from engine.models import build_model
from engine.perf import Perf
from engine.recipes import RECIPES, get_recipe
from engine.train import run_training

NO_AMP = Perf(torch.device("cpu"), torch.float32, False, False, "off").autocast
METHODS = ["std", "at", "trades", "mart", "lbgat", "arrest"]
ABLATIONS = ["v0", "stopgrad", "splitbn", "arat"]
RESNET = [f"{m}-resnet18-cifar10" for m in METHODS] + [f"ablation-{v}-resnet18-cifar10" for v in ABLATIONS]
WRN = [f"{m}-wrn34-10-cifar10" for m in METHODS] + [f"ablation-{v}-wrn34-10-cifar10" for v in ABLATIONS]
SHRINK = [
    "data.dataset=synthetic",
    "data.synthetic_size=128",
    "model.width=8",
    "train.epochs=1",
    "train.batch_size=32",
    "attack.num_steps=1",
    "eval.attacks=clean",
    "eval.num_examples=64",
    "method.balance_images=32",
    "analysis.grad_sim=true",
]


def test_every_family_has_a_recipe_per_network_and_dataset():
    for arch in ("resnet18", "wrn34-10"):
        for method in METHODS:
            for dataset in ("cifar10", "cifar100"):
                cfg = get_recipe(f"{method}-{arch}-{dataset}")
                assert (cfg.method.name, cfg.model.arch, cfg.data.dataset) == (method, arch, dataset)
                assert cfg.model.split_bn is False and method_class(method).split_bn is False
        for variant in ABLATIONS:
            assert f"ablation-{variant}-{arch}-cifar10" in RECIPES


@pytest.mark.parametrize(
    "arch, method, beta, wd, lr",
    [
        ("resnet18", "trades", 6.0, 2e-4, 0.1),
        ("wrn34-10", "trades", 6.0, 2e-4, 0.1),
        ("resnet18", "mart", 5.0, 3.5e-3, 0.01),
        ("wrn34-10", "mart", 6.0, 7e-4, 0.1),
        ("resnet18", "lbgat", 0.0, 2e-4, 0.1),
        ("resnet18", "at", None, 5e-4, 0.1),
    ],
)
def test_published_hyper_parameters(arch, method, beta, wd, lr):
    cfg = get_recipe(f"{method}-{arch}-cifar10")
    assert cfg.optim.weight_decay == wd and cfg.optim.lr == lr and cfg.epochs == 100
    if beta is not None:
        assert cfg.method.beta == beta
    assert cfg.attack.start == ("uniform" if method == "at" else "gaussian")
    assert cfg.optim.first_epoch_lr == (0.02 if method == "lbgat" else lr)  # LBGAT: AR-AT's schedule


def test_arrest_recipe():
    cfg = get_recipe("arrest-resnet18-cifar10")
    m = cfg.method
    assert (cfg.epochs, m.pretrain_epochs, m.invariance_weight, m.finetune_lr) == (120, 100, 50.0, 0.025)
    assert cfg.optim.weight_decay == 5e-4 and m.replay_until == 0.5 and abs(m.replay_cos - 3**0.5 / 2) < 1e-6


def expected_keys(method: str) -> set[str]:
    keys = {"loss", "cls", "lr"}
    if method in ("trades", "mart", "lbgat", "arrest", "arat"):
        keys |= {"inv", "grad_sim", "grad_conflict"}
    return keys | {"std": {"train_acc_clean"}, "at": {"train_acc_adv"}, "arrest": {"replay"}}.get(method, set())


@pytest.mark.parametrize("name", RESNET)
def test_smoke_run(name, tmp_path):
    extra = ["method.pretrain_epochs=1", "train.epochs=2"] if name.startswith("arrest") else []  # both stages
    cfg = apply_overrides(get_recipe(name), SHRINK + extra)
    run = run_training(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert expected_keys(cfg.method.name) <= set(rows[-1]), set(rows[-1])
    assert all(torch.isfinite(torch.tensor(v)) for k, v in rows[-1].items() if isinstance(v, float))
    results = json.loads((run / "results.json").read_text())
    assert results["recipe"] == name and 0 <= results["results"]["clean"]["accuracy"] <= 1


def one_step(cfg, image_size: int):
    cfg = apply_overrides(cfg, ["perf.dtype=fp32", "perf.channels_last=false", "attack.num_steps=1"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.num_classes)
    method = build_method(cfg, model)
    nets = Nets(model, model, model)
    if cfg.method.name == "arrest":  # the fine-tuning stage
        method.on_epoch_start(nets, [], NO_AMP, cfg.method.pretrain_epochs + 1)
    model.train()
    method.train()
    x, y = torch.rand(4, 3, image_size, image_size), torch.randint(0, cfg.data.num_classes, (4,))
    x_before, y_before = x.clone(), y.clone()
    out = method.step(nets, x, y, NO_AMP)
    assert torch.equal(x, x_before) and torch.equal(y, y_before)  # the step and its attack work on copies
    assert torch.isfinite(out.loss) and out.terms["cls"].ndim == 0
    out.loss.backward()
    assert model.conv1.weight.grad.abs().max() > 0
    return out


@pytest.mark.parametrize("name", WRN)
def test_wrn_one_step(name):
    out = one_step(get_recipe(name), image_size=8)
    assert ("inv" in out.terms) is (not name.startswith(("std-", "at-")))


@pytest.mark.parametrize("method", [*METHODS, "arat"])
def test_cifar100_one_step(method):
    cfg = get_recipe(f"{method}-resnet18-cifar100")
    assert cfg.data.num_classes == 100
    one_step(apply_overrides(cfg, ["model.width=8"]), image_size=32)
