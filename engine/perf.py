"""Every performance switch, applied in one place, in this order, and described in one start-up line.

1. device (auto: CUDA when available);  2. channels-last memory format for the model (the loaders emit it too);
3. fused kernels (Triton PGD step and dual BN; auto = on for CUDA);  4. torch.compile of the model's forward;
5. autocast dtype for the forwards (bf16, or fp16 with a gradient scaler; fp32 = no autocast).
DDP wrapping happens after these, in engine.distributed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from .config import ConfigError, PerfConfig

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"perf.device={name} but CUDA is not available here; use --set perf.device=cpu")
    return device


@dataclass
class Perf:
    """The resolved switches a run uses."""

    device: torch.device
    dtype: torch.dtype
    channels_last: bool
    compiled: bool
    kernels: str  # "off" or a description of the active kernel backends

    def autocast(self):
        if self.dtype == torch.float32:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

    def summary(self) -> str:
        dtype = {v: k for k, v in DTYPES.items()}[self.dtype]
        return (
            f"device={self.device} dtype={dtype} channels_last={self.channels_last} "
            f"compile={self.compiled} kernels={self.kernels}"
        )


def _install_kernels(model: nn.Module, cfg: PerfConfig, device: torch.device) -> str:
    wanted = cfg.kernels == "on" or (cfg.kernels == "auto" and device.type == "cuda")
    from .attacks import set_step_kernel
    from .models import set_dual_kernel

    if not wanted:
        set_step_kernel(None)
        set_dual_kernel(model, None)
        return "off"
    from . import kernels_bridge

    return kernels_bridge.install(model)


def apply(model: nn.Module, cfg: PerfConfig) -> tuple[nn.Module, Perf]:
    """Move and prepare the model; returns (the module to call in the hot loop, the resolved switches)."""
    device = resolve_device(cfg.device)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    kernels = _install_kernels(model, cfg, device)
    runner = torch.compile(model) if cfg.compile else model
    return runner, Perf(device, DTYPES[cfg.dtype], cfg.channels_last, cfg.compile, kernels)


@functools.cache
def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak for known GPUs (for achieved-TFLOP/s ratios in benchmarks)."""
    table = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
    return next((v for k, v in table.items() if k in device_name), None)
