"""Training objectives, one module each, behind a registry."""

from __future__ import annotations

from torch import nn

from ..config import ConfigError, TrainConfig
from .arat import ARAT
from .arrest import ARREST
from .at import AT
from .base import Method, Nets, StepOutput
from .lbgat import LBGAT
from .mart import MART
from .std import Standard
from .trades import TRADES

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (ARAT, AT, TRADES, MART, LBGAT, ARREST, Standard)}

__all__ = ["METHODS", "Method", "Nets", "StepOutput", "build_method", "check_method", "method_class"]


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise ConfigError(f"method.name={name!r} is not one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


def build_method(cfg: TrainConfig, model: nn.Module) -> Method:
    check_method(cfg)
    return method_class(cfg.method.name)(cfg, model)


def check_method(cfg: TrainConfig) -> None:
    """What the configured method refuses to train with (its Split-BN need, the official attack's switches)."""
    cls = method_class(cfg.method.name)
    if cls.split_bn is not None and cls.split_bn != cfg.model.split_bn:
        need = "true" if cls.split_bn else "false"
        raise ConfigError(f"method {cls.name} needs model.split_bn={need}: add --set model.split_bn={need}")
    if cfg.attack.official_quirk and not cls.official_attack:
        raise ConfigError(
            f"attack.official_quirk reproduces the AR-AT code's in-place PGD start (methods arat and at); {cls.name} "
            "runs its own published attack: drop --set attack.official_quirk=true"
        )
    if cfg.attack.official_quirk and cfg.attack.start != "uniform":
        raise ConfigError("attack.official_quirk starts from the official code's x + U(-eps, eps), whatever "
                          "attack.start says: leave attack.start=uniform")  # fmt: skip
