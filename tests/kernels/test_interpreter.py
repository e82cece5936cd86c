"""Runs the Triton tests (`-m triton`) in a fresh interpreter process when this process cannot.

TRITON_INTERPRET only takes effect if set before triton is imported (conftest.py explains why); when pytest
imported triton earlier without it, the in-process Triton tests skip and this test runs them instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import _dispatch

HERE = Path(__file__).resolve().parent


@pytest.mark.timeout(960)  # past its subprocess's own 900 s, which fails with the output
def test_triton_tests_under_interpreter_subprocess():
    importable, interpreted, detail = _dispatch.triton_status()
    if not importable:
        pytest.skip(detail)
    if torch.cuda.is_available() or interpreted:
        pytest.skip("the Triton tests already ran in this process (on CUDA or under the interpreter)")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", str(HERE), "-m", "triton", "-q", "-p", "no:cacheprovider"]
    result = subprocess.run(cmd, env=env, cwd=HERE.parents[1], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "TRITON_INTERPRET" not in result.stdout, result.stdout[-2000:]
