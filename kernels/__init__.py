"""Fused ops for adversarial training: the PGD step, the uniform random start and dual (Split-)batch norm.

Each op is a torch custom op (`torch.ops.arat.*`) that runs Triton on CUDA, the optional native C++ library on
CPU once `load_native()` has loaded it, and the plain-torch reference otherwise (see docs/kernels.md). Compiled
Triton on CUDA goes through `torch.library.triton_op` variants, so torch.compile sees the kernels themselves.
"""

from __future__ import annotations

import torch

from . import _dispatch, native
from ._dispatch import force_backend, last_backend
from .dual_bn import dual_batch_norm, dual_batch_norm_reference
from .native import load_native
from .pgd_step import pgd_step, pgd_step_reference, uniform_start, uniform_start_reference

__all__ = [
    "available_backends",
    "dual_batch_norm",
    "dual_batch_norm_reference",
    "force_backend",
    "last_backend",
    "load_native",
    "load_triton_ops",
    "pgd_step",
    "pgd_step_reference",
    "uniform_start",
    "uniform_start_reference",
]


def available_backends() -> dict[str, dict[str, object]]:
    """Which backends can run, for a start-up log line: {backend: {"active": bool, "detail": str}}."""
    importable, interpreted, detail = _dispatch.triton_status()
    cuda = torch.cuda.is_available()
    triton_active = importable and (cuda or interpreted)
    if importable and not triton_active:
        detail += ", no CUDA device: ops on CPU tensors do not use it"
    native_detail = f"loaded from {native.loaded_from()}" if native.is_loaded() else "not loaded (see load_native)"
    return {
        "triton": {"active": triton_active, "detail": detail},
        "native": {"active": native.is_loaded(), "detail": native_detail},
        "reference": {"active": True, "detail": f"plain torch {torch.__version__}"},
    }


def load_triton_ops() -> bool:
    """Register the triton_op variants (`arat::*_triton`) now, when Triton runs compiled, so that torch.compile never
    imports them in the middle of a trace; True when they are registered (False without triton or under its
    interpreter, where the ops take the custom-op route)."""
    if not _dispatch.triton_compiled():
        return False
    from .dual_bn import triton_impl as _dual_bn_triton  # noqa: F401  (registers the ops)
    from .pgd_step import triton_impl as _pgd_step_triton  # noqa: F401

    return True
