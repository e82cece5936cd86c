"""A run directory: config.json, env.json, metrics.jsonl, checkpoints/{latest,final}.pt, results.json.

Every file is written atomically (temporary file + rename), so an interrupted run never leaves a half file.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig
from .errors import UserError


class RunDirError(UserError):
    """An output directory that can't be used; the message says what to do."""


def atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict[str, Any]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = device.type == "cuda"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "device_type": device.type,
        "num_threads": torch.get_num_threads(),
        "git_commit": git_commit(),
        "host": platform.node(),
    }


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"

    def create(self, resume: bool) -> None:
        if self.path.exists() and not resume and any(self.path.iterdir()):
            raise RunDirError(
                f"{self.path} already holds a run: resume it with `arat train --resume {self.path}` "
                "or pick another --out"
            )
        try:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise RunDirError(f"cannot write to {self.path} ({e.strerror}); pick a writable --out") from None

    def write_json(self, name: str, data: dict) -> None:
        atomic_write(self.path / name, lambda f: f.write((json.dumps(data, indent=2) + "\n").encode()))

    def read_json(self, name: str) -> dict:
        return json.loads((self.path / name).read_text())

    def save_config(self, cfg: TrainConfig) -> None:
        self.write_json("config.json", cfg.to_dict())

    def save_checkpoint(self, name: str, state: dict) -> None:
        atomic_write(self.checkpoints / name, lambda f: torch.save(state, f))

    def checkpoint(self, name: str) -> Path:
        return self.checkpoints / name

    def metrics(self) -> list[dict]:
        """The rows of metrics.jsonl; a half-written last line (a kill during the append) is dropped."""
        path = self.path / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        rows = []
        for i, line in enumerate(lines):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if i < len(lines) - 1:
                    raise RunDirError(
                        f"{path} line {i + 1} is not JSON; fix or delete that line, then resume"
                    ) from None
        return rows

    def remove_stale_temp_files(self) -> None:
        """Temporary files of atomic writes that a kill interrupted (`.latest.pt.XXXX`): never read, only clutter."""
        for folder in (self.path, self.checkpoints):
            for tmp in folder.glob(".*.*") if folder.is_dir() else []:
                if tmp.is_file() and tmp.name != ".write-test":
                    tmp.unlink(missing_ok=True)

    def rewrite_metrics(self, rows: list[dict]) -> None:
        text = "".join(json.dumps(r) + "\n" for r in rows)
        atomic_write(self.path / "metrics.jsonl", lambda f: f.write(text.encode()))

    def append_metrics(self, row: dict) -> None:
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
