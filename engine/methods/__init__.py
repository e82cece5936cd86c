"""Training objectives, one module each, behind a registry."""

from __future__ import annotations

from torch import nn

from ..config import ConfigError, TrainConfig
from .arat import ARAT
from .base import Method, Nets, StepOutput

METHODS: dict[str, type[Method]] = {"arat": ARAT}

__all__ = ["METHODS", "Method", "Nets", "StepOutput", "build_method", "method_class"]


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise ConfigError(f"method.name={name!r} is not one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


def build_method(cfg: TrainConfig, model: nn.Module) -> Method:
    return method_class(cfg.method.name)(cfg, model)
