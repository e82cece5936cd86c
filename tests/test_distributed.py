"""DDP on CPU: two processes under torchrun (gloo), the smoke recipe."""

import json
import os
import subprocess
import sys

import pytest
import torch


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "engine.cli",
        "train",
        "--recipe",
        "smoke",
        "--out",
        str(out),
        "--set",
        "eval.attacks=clean",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("arat: recipe=smoke") == 1  # only rank 0 prints
    assert "world_size=2" in proc.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[0]["images_per_s"] > 0
    state = torch.load(out / "checkpoints" / "latest.pt", weights_only=False)
    assert len(state["rng"]) == 2  # both ranks' RNG states, for an exact resume
    assert json.loads((out / "results.json").read_text())["results"]["clean"]["num_examples"] == 64
