"""Helpers shared by the method tests (a plain module: `conftest` is ambiguous with tests/kernels/conftest.py)."""

import torch

from engine.config import apply_overrides
from engine.methods import Nets, build_method
from engine.models import build_model


def method_case(tiny_cfg, method, *overrides):
    """(cfg, model, method, nets) for a single-BN method on the tiny config: fp32, contiguous, train mode."""
    cfg = apply_overrides(
        tiny_cfg,
        [f"method.name={method}", "model.split_bn=false", "perf.dtype=fp32", "perf.channels_last=false", *overrides],
    )
    torch.manual_seed(0)
    model = build_model(cfg.model, 10)
    method = build_method(cfg, model)
    model.train()
    method.train()
    return cfg, model, method, Nets(model, model, model)
