"""Optional native CPU library (csrc/, built with CMake): finds it, loads it, and says whether it is loaded.

The library defines its own operator namespace `arat_native` (TORCH_LIBRARY + a CPU kernel per op). The public
`arat::*` ops are Python custom ops; on CPU they call `torch.ops.arat_native.*` when `is_loaded()` and the call is
eligible, and the plain-torch reference otherwise. Nothing is loaded at import: call `load_native()` once at start-up.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

log = logging.getLogger("kernels")

LIBRARY_NAME = "libarat_native.so"
ENV_VAR = "ARAT_NATIVE_LIB"
_loaded_from: str | None = None


def default_paths() -> list[Path]:
    """Where `load_native()` looks: $ARAT_NATIVE_LIB, then build/ at the repository root (cmake -B build)."""
    paths = [Path(os.environ[ENV_VAR])] if os.environ.get(ENV_VAR) else []
    return [*paths, Path(__file__).resolve().parents[1] / "build" / LIBRARY_NAME]


def load_native(path: str | os.PathLike | None = None) -> bool:
    """Load the native library (idempotent); True when its ops are available. An explicit path must exist."""
    global _loaded_from
    if path is not None and not Path(path).is_file():
        raise ValueError(f"native library {path} does not exist: build it with CMake (see docs/kernels.md)")
    if _loaded_from is not None:
        return True
    candidates = [Path(path)] if path is not None else default_paths()
    for candidate in candidates:
        if not candidate.is_file():
            continue
        try:
            torch.ops.load_library(str(candidate))
        except (OSError, RuntimeError) as err:  # e.g. built against another torch: report it, keep the reference
            log.warning("could not load native library %s: %s", candidate, err)
            continue
        _loaded_from = str(candidate)
        return True
    return False


def is_loaded() -> bool:
    return _loaded_from is not None


def loaded_from() -> str | None:
    return _loaded_from
