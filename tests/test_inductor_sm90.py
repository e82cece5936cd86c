"""The engine's networks compiled by Inductor for sm_90 on this CPU (tests/inductor_sm90_network.py, with the
stand-ins of tests/fake_cuda.py): the training forward (dual branch, train mode, bf16, channels-last, the fused dual
BN launched by Inductor), the evaluation forward, and the evaluation forward with a symbolic batch (AutoAttack's
role), for ResNet-18 and WRN-34-10. Before the fp32 casts of the
kernels' float arguments the training forward failed as every compiled step did on the H200 (2026-12-04). Forward
graphs only; nothing runs; the GPU check measures the rest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FUSED_FORWARD = ["_normalize_kernel", "_stats_finalize_kernel", "_stats_partial_kernel"]


@pytest.mark.timeout(960)  # past its subprocess's own 900 s, which fails with the output
@pytest.mark.parametrize("arch", ["resnet18", "wrn34-10"])
def test_the_networks_compile_for_sm90_with_the_fused_dual_bn(arch):
    pytest.importorskip("triton", reason="triton is optional (pip install arat[kernels])")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(REPO / "tests" / "inductor_sm90_network.py"), arch], env=env,
                            cwd=REPO, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    graphs = json.loads(result.stdout.strip().splitlines()[-1])["graphs"]
    assert graphs["train forward"]["user"] == FUSED_FORWARD, graphs
    assert graphs["eval forward"]["user"] == [], graphs  # one BN branch in evaluation: aten's, fused by Inductor
    aa = graphs["autoattack forward, symbolic batch"]  # AutoAttack's role: one graph for every subset size
    assert aa["user"] == [] and not aa["batch"].isdigit(), graphs  # the batch stayed a symbol, e.g. "s26"
    assert all(g["kernels"] > 10 for g in graphs.values()), graphs  # Inductor's own kernels around them
