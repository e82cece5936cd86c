"""ruff (lint and format, configured in pyproject.toml) is clean on the code and the README's examples: the style
guide's last rule, checked in CI with the ruff that constraints/cpu.txt pins."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHECKED = ["engine", "kernels", "bench", "scripts", "tests", "README.md"]


def ruff() -> str:
    """The venv's ruff, when it is the pinned version (another one may add rules or format otherwise: skipped)."""
    pinned = re.search(r"^ruff==(\S+)", (REPO / "constraints" / "cpu.txt").read_text(), re.M).group(1)
    exe = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if exe is None:
        pytest.skip("ruff is not installed (the test extra: pip install -e '.[test]')")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True).stdout.split()[-1]
    if version != pinned:
        pytest.skip(f"ruff {version} here; the code is checked with ruff {pinned} (constraints/cpu.txt)")
    return exe


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]])
def test_ruff_finds_nothing(command):
    done = subprocess.run([ruff(), *command, "--no-cache", *CHECKED], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
