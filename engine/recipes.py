"""Named runs. A recipe is a function returning a TrainConfig; `arat recipes` lists them."""

from __future__ import annotations

from collections.abc import Callable

from .config import (
    AttackConfig,
    ConfigError,
    DataConfig,
    EvalConfig,
    MethodConfig,
    ModelConfig,
    OptimConfig,
    SWAConfig,
    TrainConfig,
)

Recipe = Callable[[], TrainConfig]
RECIPES: dict[str, tuple[Recipe, str]] = {}

ARCH_LAMBDA = {"resnet18": 30.0, "wrn34-10": 100.0}  # METHOD 4


def recipe(name: str, description: str):
    def register(fn: Recipe) -> Recipe:
        RECIPES[name] = (fn, description)
        return fn

    return register


def arat_full(arch: str, dataset: str, swa: bool = False) -> TrainConfig:
    """AR-AT at full scale with exactly the METHOD hyper-parameters (100 epochs, batch 128, PGD-10)."""
    return TrainConfig(
        epochs=100,
        batch_size=128,
        data=DataConfig(dataset=dataset),
        model=ModelConfig(arch=arch, split_bn=True),
        method=MethodConfig(name="arat", invariance_weight=ARCH_LAMBDA[arch]),
        optim=OptimConfig(lr=0.1, first_epoch_lr=0.02, milestones=(76, 91), weight_decay=5e-4),
        swa=SWAConfig(enabled=swa, start_epoch=76, every=500),
    )


for _arch in ("resnet18", "wrn34-10"):
    for _dataset in ("cifar10", "cifar100"):
        recipe(f"arat-{_arch}-{_dataset}", f"AR-AT, {_arch}, {_dataset}, 100 epochs (METHOD 4; GPU)")(
            lambda a=_arch, d=_dataset: arat_full(a, d)
        )
    recipe(f"arat-swa-{_arch}-cifar10", f"AR-AT+SWA, {_arch}, cifar10, averaging from epoch 76 (GPU)")(
        lambda a=_arch: arat_full(a, "cifar10", swa=True)
    )


@recipe(
    "demo",
    "AR-AT on a CPU budget (~10 min on 2 cores): ResNet-18 width 16, 10k real CIFAR-10 images "
    "(synthetic if absent), 4 epochs, PGD-5 training, evaluation on 500 test images",
)
def demo() -> TrainConfig:
    return TrainConfig(
        epochs=4,
        batch_size=128,
        log_every=10,
        data=DataConfig(dataset="cifar10", train_subset=10000, synthetic_fallback=True, synthetic_size=10000),
        model=ModelConfig(arch="resnet18", width=16),
        attack=AttackConfig(num_steps=5, step_size=2.5 / 255),
        method=MethodConfig(name="arat", invariance_weight=30.0),
        optim=OptimConfig(lr=0.1, first_epoch_lr=0.02, milestones=(3,)),
        eval=EvalConfig(attacks=("clean", "pgd20", "aa"), num_examples=500, batch_size=250),
    )


@recipe("smoke", "seconds-long check of the whole path: synthetic data, tiny ResNet-18 (width 8), 2 epochs")
def smoke() -> TrainConfig:
    return TrainConfig(
        epochs=2,
        batch_size=32,
        log_every=2,
        data=DataConfig(dataset="synthetic", synthetic_size=256),
        model=ModelConfig(arch="resnet18", width=8),
        attack=AttackConfig(num_steps=2, step_size=4 / 255),
        method=MethodConfig(name="arat", invariance_weight=30.0, balance_images=64),
        optim=OptimConfig(lr=0.05, first_epoch_lr=0.02, milestones=(1,)),
        eval=EvalConfig(attacks=("clean", "pgd20"), num_examples=64, batch_size=64),
    )


def get_recipe(name: str) -> TrainConfig:
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; `arat recipes` lists them")
    cfg = RECIPES[name][0]()
    cfg.recipe = name
    cfg.description = RECIPES[name][1]
    return cfg
