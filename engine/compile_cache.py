"""Inductor's on-disk cache, keyed by the CPU's vector ISA.

Inductor's cache (`TORCHINDUCTOR_CACHE_DIR`, default /tmp/torchinductor_<user>) is shared by every process on the
machine and outlives them, but its keys do not cover the CPU's vector ISA: a graph cached under AVX-512 and
reloaded where AVX2 is in force (another CPU with the same disk, or ATEN_CPU_CAPABILITY=avx2) mixes kernels
generated for two vector widths and returned NaN gradients here (tests/test_compile_cache.py reproduces it). So,
unless the user chose a directory, each ISA gets its own subdirectory.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

ENV = "TORCHINDUCTOR_CACHE_DIR"


def cpuinfo(*keys: str) -> str:
    """The value of the first /proc/cpuinfo line starting with one of `keys` ("" where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(keys):
                return line.split(":", 1)[-1].strip()
    except OSError:
        pass
    return ""


def cpu_key() -> str:
    """The CPU capability torch uses (honours ATEN_CPU_CAPABILITY) plus a hash of the CPU's feature flags."""
    import torch

    digest = hashlib.sha256(cpuinfo("flags", "Features").encode()).hexdigest()[:8]
    return f"{torch.backends.cpu.get_cpu_capability().lower()}-{digest}"


def isolate_inductor_cache() -> str:
    """Point Inductor's cache at a per-ISA directory (a no-op when the user set TORCHINDUCTOR_CACHE_DIR);
    returns the directory in use. Must run before the first compile of the process."""
    if os.environ.get(ENV):
        return os.environ[ENV]
    user = os.environ.get("USER", "user").replace(os.sep, "_") or "user"
    path = Path(tempfile.gettempdir()) / f"torchinductor_{user}" / f"arat-{cpu_key()}"
    os.environ[ENV] = str(path)
    return str(path)
