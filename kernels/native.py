"""Optional native CPU library (csrc/, built with CMake): finds it, loads it, and says whether it is loaded.

The library defines its own operator namespace `arat_native` (TORCH_LIBRARY + a CPU kernel per op). The public
`arat::*` ops are Python custom ops; on CPU they call `torch.ops.arat_native.*` when `is_loaded()` and the call is
eligible, and the plain-torch reference otherwise. Nothing is loaded at import: call `load_native()` once at start-up.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
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


SOURCES = Path(__file__).resolve().parents[1] / "csrc"
MARKER = re.compile(rb"arat-native-sources:([0-9a-f]{64})")


def source_hash(folder: Path = SOURCES) -> str | None:
    """The hash CMakeLists.txt compiles into the library: SHA-256 of the csrc/*.cpp and *.h files' SHA-256 digests,
    in name order; None where the sources are not there (an installed copy without csrc/)."""
    files = sorted([*folder.glob("*.cpp"), *folder.glob("*.h")], key=lambda f: f.name)
    if not files:
        return None
    digests = "".join(hashlib.sha256(f.read_bytes()).hexdigest() for f in files)
    return hashlib.sha256(digests.encode()).hexdigest()


def built_from(library: Path) -> str | None:
    """The source hash compiled into `library` (None: a library built before 2026-12-06, or not this one)."""
    found = MARKER.search(library.read_bytes())
    return found.group(1).decode() if found else None


def load_native(path: str | os.PathLike | None = None) -> bool:
    """Load the native library (idempotent); True when its ops are available. An explicit path must exist. A
    library built from other sources than the checkout's csrc/ is not used (its kernels' rules may have changed
    since: the NaN handling did twice): the ops run their reference, with a warning to rebuild."""
    global _loaded_from
    if path is not None and not Path(path).is_file():
        raise ValueError(f"native library {path} does not exist: build it with CMake (see docs/kernels.md)")
    if _loaded_from is not None:
        return True
    candidates = [Path(path)] if path is not None else default_paths()
    expected = source_hash()  # the checkout's sources, read once for every candidate
    for candidate in candidates:
        if not candidate.is_file():
            continue
        if expected is not None and built_from(candidate) != expected:
            log.warning(
                "native library %s was built from other sources than %s holds: rebuild it (bash "
                "scripts/build_native.sh); the fused ops run their plain-torch reference",
                candidate,
                SOURCES,
            )
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
