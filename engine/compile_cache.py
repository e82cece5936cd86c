"""Inductor's on-disk cache, keyed by the CPU's vector ISA.

Inductor's cache (`TORCHINDUCTOR_CACHE_DIR`, default /tmp/torchinductor_<user>) is shared by every process on the
machine and outlives them, but its keys do not cover the CPU's vector ISA: a graph cached under AVX-512 and
reloaded where AVX2 is in force (another CPU with the same disk, or ATEN_CPU_CAPABILITY=avx2) mixes kernels
generated for two vector widths and returned NaN gradients here (tests/test_compile_cache.py reproduces it). So,
unless the user chose a directory, each ISA gets its own subdirectory.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ENV = "TORCHINDUCTOR_CACHE_DIR"
CHOSEN_ENV = "ARAT_INDUCTOR_CACHE_DIR"  # the folder an engine process chose (so not a user's), for its children


def cpuinfo(*keys: str) -> str:
    """The value of the first /proc/cpuinfo line starting with one of `keys` ("" where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(keys):
                return line.split(":", 1)[-1].strip()
    except OSError:
        pass
    return ""


def mac_cpu() -> str:
    """macOS (no /proc/cpuinfo): the CPU's name as sysctl gives it ("Apple M2 Pro"), "" elsewhere or unreadable."""
    if sys.platform != "darwin":
        return ""
    try:
        done = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def cpu_name() -> str:
    """The CPU's model name: /proc/cpuinfo's, or sysctl's on macOS; "" where neither says (an ARM /proc/cpuinfo has no
    model name line)."""
    return cpuinfo("model name") or mac_cpu()


def cpu_key() -> str:
    """The CPU capability torch uses (honours ATEN_CPU_CAPABILITY) plus a hash of the CPU's feature flags (on macOS,
    of its name: every Mac hashed the same empty string)."""
    import torch

    digest = hashlib.sha256((cpuinfo("flags", "Features") or mac_cpu()).encode()).hexdigest()[:8]
    return f"{cpu_capability(torch.backends.cpu.get_cpu_capability())}-{digest}"


def cpu_capability(name: str) -> str:
    """torch's CPU capability as a folder name: lower case, "default" for the baseline (torch 2.6 calls it "NO AVX":
    the folder was named with a space), anything else outside [a-z0-9_] as "-"."""
    name = name.strip().lower()
    return "default" if name in ("no avx", "default") else re.sub(r"[^a-z0-9_]+", "-", name) or "default"


def inductor_default_dir() -> str:
    """Inductor's own default cache directory, named as Inductor names it (torch 2.13's cache_dir_utils): the
    account's login name (the password file's where $USER is unset), else uid_N. A name of $USER alone ("user" where
    it was unset) gave every account of a container one folder, which the first one's permissions closed to the
    others."""
    try:
        user = getpass.getuser()
    except (KeyError, ModuleNotFoundError, OSError):
        user = f"uid_{os.getuid()}" if hasattr(os, "getuid") else "unknown_user"
    return os.path.abspath(os.path.join(tempfile.gettempdir(), "torchinductor_" + re.sub(r'[\\/:*?"<>|]', "_", user)))


def isolate_inductor_cache() -> str:
    """Point Inductor's cache at a per-ISA directory (a no-op when the user set TORCHINDUCTOR_CACHE_DIR);
    returns the directory in use. Must run before the first compile of the process. Inductor writes its default
    into the variable at its first compile, and child processes inherit it: that value is not a user's choice.
    Nor is a per-ISA folder this function chose in a parent process: a child running torch at another ISA
    (ATEN_CPU_CAPABILITY) loaded the parent's graphs from it and computed gradients 7x too large (helper-113);
    such a child takes the sibling folder of its own ISA."""
    chosen = os.environ.get(ENV)
    if chosen and chosen == os.environ.get(CHOSEN_ENV):  # inherited from an engine process (a user's is kept)
        path = Path(os.path.abspath(chosen)).parent / f"arat-{cpu_key()}"
    elif chosen and os.path.abspath(chosen) != inductor_default_dir():
        return chosen
    else:
        path = Path(inductor_default_dir()) / f"arat-{cpu_key()}"
    os.environ[ENV] = os.environ[CHOSEN_ENV] = str(path)  # the second says to a child that the engine chose it
    return str(path)
