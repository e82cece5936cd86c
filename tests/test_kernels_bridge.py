"""engine/kernels_bridge.py: the fused ops at the engine's hook points, and the Split-BN pairs they cannot run."""

import copy
import logging

import pytest
import torch

from engine import kernels_bridge
from engine.config import ModelConfig
from engine.models import build_model
from engine.models.splitbn import dual_bn_reference


@pytest.mark.parametrize("split_bn", [True, False])
def test_a_bn_pair_the_fused_op_cannot_run_is_named_at_install_and_runs_the_reference(caplog, split_bn):
    """The per-call fallback cannot log (torch.compile traces it, and a log call would break the graph): `install`
    names each ineligible pair once instead (helper-132: the fallback was silent). Without Split-BN one BN serves
    both halves."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(width=8, split_bn=split_bn), 10).train()
    broken = model.bn1.adv if split_bn else model.bn1
    broken.momentum = None  # cumulative average: the fused op updates with a fixed momentum
    with caplog.at_level(logging.WARNING, logger="kernels"):
        kernels_bridge.install(model, dual=True)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dual BN")]
    assert said == [f"dual BN bn1 runs the plain-torch reference, not the fused op: its {'adv ' if split_bn else ''}"
                    "BN has no running statistics, no affine parameters or momentum None"]  # fmt: skip
    assert model.bn1.dual_kernel is kernels_bridge.fused_dual_bn
    twin = copy.deepcopy(model.bn1)
    pair = (twin.clean, twin.adv) if split_bn else (twin, twin)
    x = torch.rand(4, 8, 16, 16)
    torch.testing.assert_close(model.bn1(x, bn="dual", relu=True), dual_bn_reference(x, *pair, True), rtol=0, atol=0)
    assert torch.equal(broken.running_mean, pair[1].running_mean)  # updated alike


@pytest.mark.parametrize("change", ["momentum", "eps"])
def test_halves_that_differ_are_ineligible(change):
    clean, adv = torch.nn.BatchNorm2d(4), torch.nn.BatchNorm2d(4)
    assert kernels_bridge.ineligible(clean, adv) is None
    setattr(adv, change, 0.5)
    assert kernels_bridge.ineligible(clean, adv) == "its halves differ in momentum or eps"


def test_the_dual_branch_refuses_an_odd_batch_in_one_line():
    model = build_model(ModelConfig(width=8), 10)
    with pytest.raises(ValueError, match=r"bn='dual' needs a batch of 2B images .* got 5"):
        model(torch.rand(5, 3, 32, 32), bn="dual")
