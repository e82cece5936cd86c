"""The entry scripts' decisions, run with stand-in commands (no pip, apt-get or torch): what
install_data_backends.sh reports when only root is missing (scripts/test.sh goes on at its exit 3, the backend's
tests skip) and when a build fails, and what setup.sh does with a venv holding another torch."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def stand_ins(tmp_path: Path, python_body: str, pkg_config_ok: bool = False) -> dict[str, str]:
    """A bin folder first on PATH: a non-root `id`, a `sudo` that wants a password, `pkg-config`, and a python
    whose behaviour `python_body` (bash) sets; calls are logged to calls.txt."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    log = tmp_path / "calls.txt"
    scripts = {
        "id": "echo 1000",
        "sudo": 'echo "sudo $*" >> "$LOG"; exit 1',  # `sudo -n true` fails: a password would be asked
        "pkg-config": "exit 0" if pkg_config_ok else "exit 1",
        "apt-get": 'echo "apt-get $*" >> "$LOG"; exit 0',
        "python": 'echo "python $*" >> "$LOG"\n' + python_body,
    }
    for name, body in scripts.items():
        path = bin_ / name
        path.write_text(f"#!/usr/bin/env bash\n{body}\n")
        path.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "LOG": str(log), "PYTHON": str(bin_ / "python")}


def run_script(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(REPO / "scripts" / "install_data_backends.sh"), *args],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


NO_FFCV_DALI_OK = """case "$*" in *"import ffcv"*) exit 1 ;; *"import nvidia.dali"*) exit 0 ;; esac; exit 0"""


def test_ffcv_without_root_still_installs_dali_and_says_only_root_was_missing(tmp_path):
    env = stand_ins(tmp_path, NO_FFCV_DALI_OK)
    result = run_script(env, "all")
    assert result.returncode == 3, result.stderr  # scripts/test.sh goes on at 3: ffcv's tests skip
    assert "need root for: apt-get" in result.stderr
    assert "dali: already installed" in result.stdout  # dali was still reached
    calls = (tmp_path / "calls.txt").read_text()
    assert "apt-get" not in calls.replace("sudo -n true", "")  # nothing ran apt-get without root
    assert "-m pip" not in calls  # ffcv's pip steps never started


def test_an_ffcv_build_failure_stops_the_script(tmp_path):
    """Root is not the problem (the libraries are there) but pip fails: exit 1, not 3, and dali is not reached."""
    body = """case "$*" in *"-m pip"*) exit 1 ;; *"import ffcv"*) exit 1 ;; esac; exit 0"""
    result = run_script(stand_ins(tmp_path, body, pkg_config_ok=True), "all")
    assert result.returncode == 1, result.stderr
    assert "dali" not in result.stdout
    assert "need root" not in result.stderr


def test_ffcv_alone_without_root_exits_3(tmp_path):
    result = run_script(stand_ins(tmp_path, NO_FFCV_DALI_OK), "ffcv")
    assert result.returncode == 3 and "need root for: apt-get" in result.stderr


@pytest.mark.parametrize("installed", ["2.11.0+cu130", None])
def test_setup_reinstalls_a_venv_torch_other_than_the_pin(tmp_path, installed):
    """setup.sh, copied with its constraints into a folder whose .venv/bin/python is a stand-in: with another torch
    in the venv it says so and installs the pin (the stand-in's pip then fails it: setup stops with its hint); with
    the pinned torch and a fresh stamp it runs no pip."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    (root / "constraints").mkdir()
    for rel in ("scripts/setup.sh", "constraints/cpu.txt", "pyproject.toml"):
        (root / rel).write_bytes((REPO / rel).read_bytes())
    pinned = next(
        line.split("==")[1] for line in (REPO / "constraints/cpu.txt").read_text().splitlines()
        if line.startswith("torch==")
    )  # fmt: skip
    version = installed or pinned
    venv_python = root / ".venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    log = tmp_path / "calls.txt"
    venv_python.write_text(
        "#!/usr/bin/env bash\n"
        f'echo "python $*" >> {log}\n'
        f'case "$*" in *importlib.metadata*) echo {version} ;; *"-m pip install"*" -e "*) exit 1 ;; esac\n'
    )
    venv_python.chmod(0o755)
    (root / ".venv" / ".arat-installed").touch()
    env = {**os.environ, "ARAT_DATA_DIR": str(tmp_path / "data")}
    result = subprocess.run(["bash", str(root / "scripts" / "setup.sh")], env=env, capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    calls = log.read_text()
    if installed:
        assert f".venv has torch {installed}, the pin is {pinned}" in result.stderr
        assert "-m pip install" in calls and result.returncode == 1
        assert "ARAT_TORCH_INDEX=https://download.pytorch.org/whl/cpu" in result.stderr
    else:
        assert result.returncode == 0, result.stderr
        assert "-m pip install" not in calls
