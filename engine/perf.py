"""Every performance switch, applied in one place, in this order, and described in one start-up line.

1. device (auto: CUDA when available);  2. channels-last memory format for the model (the loaders emit it too);
3. fused kernels (Triton PGD step and dual BN; auto = on for CUDA);  4. torch.compile of the model's forward;
5. autocast dtype for the forwards (auto: what the hardware runs natively, see `resolve_dtype`);
6. cuDNN autotuning (auto: on for CUDA; every shape in the hot loop is static).
DDP wrapping happens after these, in engine.distributed.

Hardware-dependent defaults are read from the machine at run time, never tuned to the one they were written on:
on a CPU without native bf16 (e.g. AVX2-only), bf16 autocast is emulated and ran ~10-15x slower than fp32.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from .config import ConfigError, PerfConfig

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"perf.device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"perf.device={name} but CUDA is not available here; use --set perf.device=cpu")
    return device


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 / AMX via oneDNN); elsewhere bf16 is emulated."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without the query: assume emulation (the safe choice)
        return False


def cuda_has_native_bf16(device: torch.device) -> bool:
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_dtype(name: str, device: torch.device) -> tuple[torch.dtype, str]:
    """(autocast dtype, why). auto: bf16 where the device runs it natively; else fp16 with a scaler on CUDA, fp32
    on CPU (CPU fp16 autocast is emulated too)."""
    if name != "auto":
        dtype = DTYPES[name]
        if dtype == torch.bfloat16 and device.type == "cpu" and not cpu_has_native_bf16():
            return dtype, "set; WARNING: this CPU emulates bf16 (~10x slower than fp32): use perf.dtype=auto"
        return dtype, "set"
    if device.type == "cuda":
        if cuda_has_native_bf16(device):
            return torch.bfloat16, "auto: the GPU has bf16"
        return torch.float16, "auto: the GPU lacks bf16, fp16 with a gradient scaler"
    if cpu_has_native_bf16():
        return torch.bfloat16, "auto: the CPU has native bf16"
    return torch.float32, "auto: the CPU has no native bf16 (emulated bf16 is ~10x slower)"


def resolve_switch(value: str, device: torch.device) -> bool:
    """An auto|on|off switch whose auto means: on for CUDA."""
    return value == "on" or (value == "auto" and device.type == "cuda")


@dataclass
class Perf:
    """The resolved switches a run uses."""

    device: torch.device
    dtype: torch.dtype
    channels_last: bool
    compiled: bool
    kernels: str  # "off" or a description of the active kernel backends
    dtype_reason: str = "set"
    cudnn_benchmark: bool = False

    def autocast(self):
        if self.dtype == torch.float32:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

    def summary(self) -> str:
        hardware = (
            f"cudnn_benchmark={self.cudnn_benchmark}"
            if self.device.type == "cuda"
            else (f"threads={torch.get_num_threads()}")
        )
        return (
            f"device={self.device} dtype={DTYPE_NAMES[self.dtype]} ({self.dtype_reason}) "
            f"channels_last={self.channels_last} compile={self.compiled} kernels={self.kernels} {hardware}"
        )


def _install_kernels(model: nn.Module, cfg: PerfConfig, device: torch.device) -> str:
    from .attacks import set_step_kernel
    from .models import set_dual_kernel

    if not resolve_switch(cfg.kernels, device):
        set_step_kernel(None)
        set_dual_kernel(model, None)
        return "off"
    from . import kernels_bridge

    return kernels_bridge.install(model)


def apply(model: nn.Module, cfg: PerfConfig) -> tuple[nn.Module, Perf]:
    """Move and prepare the model; returns (the module to call in the hot loop, the resolved switches)."""
    device = resolve_device(cfg.device)
    dtype, why = resolve_dtype(cfg.dtype, device)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    kernels = _install_kernels(model, cfg, device)
    runner = torch.compile(model) if cfg.compile else model
    benchmark = resolve_switch(cfg.cudnn_benchmark, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = benchmark  # process-wide: one run per process
    return runner, Perf(device, dtype, cfg.channels_last, cfg.compile, kernels, why, benchmark)


@functools.cache
def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak for known GPUs (for achieved-TFLOP/s ratios in benchmarks)."""
    table = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
    return next((v for k, v in table.items() if k in device_name), None)
