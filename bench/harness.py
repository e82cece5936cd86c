"""The benchmarks' shared harness: provenance, JSON-lines output and a markdown table."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python bench/<script>.py` from anywhere, without installing the package
    sys.path.insert(0, str(REPO))


def provenance(device=None) -> dict:
    """Versions, device and commit stamped on every row, so results stay interpretable later. `device`: the one the
    rows ran on (default: the GPU where CUDA exists, else the CPU); a CPU benchmark on a GPU machine passes "cpu"."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    from engine.perf import cpu_has_native_bf16

    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    # the tracked files changed since that commit: the rows did not run its code (untracked files aside)
    changed = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                             capture_output=True, text=True)  # fmt: skip
    on_gpu = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    device = torch.cuda.get_device_name(device) if on_gpu else platform.processor() or "cpu"
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda if on_gpu else None,
        "cudnn": torch.backends.cudnn.version() if on_gpu else None,
        "device": device,
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "cpu_threads": torch.get_num_threads(),
        "commit": commit.stdout.strip() or None,
        "dirty": bool(changed.stdout.strip()) if commit.returncode == 0 else None,
    }


def run_cli(main, name: str) -> None:
    """Run a benchmark's `main()` as a command: bad input (the engine's UserError: a config value, a path, a
    dataset, a checkpoint) ends in one line and exit status 2 instead of a traceback; main's return is the status."""
    from engine.errors import UserError

    try:
        status = main()
    except UserError as e:
        print(f"{name}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(status)


def bench_device(name: str):
    """A benchmark's --device (auto, cpu, cuda, cuda:N) as a torch.device; a bad one is a UserError naming --device."""
    import torch

    from engine.errors import UserError
    from engine.perf import resolve_device

    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here; use --device cpu")
    try:
        return resolve_device(name)
    except UserError as e:
        raise UserError(f"--device {name}: {e}".replace("perf.device=", "")) from None


def positive_int(text: str) -> int:
    """argparse type: an int >= 1 (a count of rounds, images, repetitions, epochs)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def cpu_model() -> str:
    """The CPU's model name (benchmark rows differ by CPU: AVX2 vs AVX-512, native bf16 or not)."""
    from engine.compile_cache import cpu_name

    return cpu_name() or platform.processor() or platform.machine()


def append_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Rows appended, each on a line of its own: after a benchmark killed mid-row, the next begins a new line (it
    continued the half line, leaving a line no JSON reader takes in the middle of the file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab+") as f:
        ends_open = False
        if f.tell() > 0:  # appending: at the end already
            f.seek(-1, 2)
            ends_open = f.read(1) != b"\n"
        f.write(b"\n" * ends_open + "".join(json.dumps(row) + "\n" for row in rows).encode())


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return "" if value is None else str(value)
