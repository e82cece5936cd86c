"""Traces the triton_op route as AOTAutograd does (functionalized make_fx over fake tensors) and prints, per traced
function, the graph's Triton kernel nodes and any opaque `arat` op, as JSON. Run by test_triton_ops.py in a
subprocess without TRITON_INTERPRET: tracing needs compiled (@triton.jit) kernels. Needs no GPU: the pgd_step and
uniform_start routes are traced on fake CUDA tensors; dual batch norm (forward and both backward passes through its
autograd formula) on fake CPU tensors, since this CPU-only torch cannot take views or run autograd on fake CUDA
tensors.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch._subclasses.functional_tensor import FunctionalTensorMode, dispatch_functionalize
from torch.fx.experimental.proxy_tensor import make_fx

import kernels
from kernels import _triton_util

EPS, ALPHA = 8 / 255, 2 / 255


def graph_targets(fn, *args) -> list[str]:
    with args[0].fake_mode:  # factories inside the ops make fake tensors on the inputs' device
        gm = make_fx(dispatch_functionalize(fn, mode=FunctionalTensorMode()), tracing_mode="real")(*args)
    return [str(node.target) for node in gm.graph.nodes if node.op == "call_function"]


def summary(targets: list[str]) -> dict:
    return {
        "kernels": targets.count("triton_kernel_wrapper_functional"),
        "opaque": [t for t in targets if t.startswith("arat.")],
    }


def main() -> None:
    assert kernels.load_triton_ops(), "needs triton importable and TRITON_INTERPRET unset"
    from kernels.dual_bn.triton_impl import dual_bn_op
    from kernels.pgd_step.triton_impl import uniform_start_op

    _triton_util._sm_count = lambda index: 132  # no device to ask; only sizes the dual-BN grid
    # torch 2.6's wrap_triton makes a launch's num_warps an autotuner, which wants a driver (2.11's does not; 2.7-2.10
    # not run: given the stub too)
    if torch.__version__ < "2.11":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: fake_cuda
        from fake_cuda import install_triton_stub

        install_triton_stub()
    # Which arguments a kernel writes is read from its Triton IR, which needs a GPU driver; without one torch warns
    # (with a traceback) and assumes every argument is written. The graph's kernel nodes are the same either way.
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)  # this process traces, it does not compile

    def pgd(x, x_adv, grad):
        return kernels.pgd_step(x, x_adv, grad * 2.0, EPS, ALPHA)  # the public function: the routing too

    def start(x, seed):
        return uniform_start_op(x, EPS, seed)  # the public one draws its seed with the CUDA generator

    def dual(x, cw, cb, aw, ab, crm, crv, arm, arv):
        y, _, _ = dual_bn_op(x, cw, cb, aw, ab, crm, crv, arm, arv, True, 1e-5, True)
        return torch.autograd.grad(y.float().square().sum(), [x, cw, cb, aw, ab])

    with FakeTensorMode():
        x, seed = torch.empty(8, 3, 32, 32, device="cuda"), torch.empty(1, device="cuda", dtype=torch.int64)
        h = torch.empty_strided((16, 64, 8, 8), (4096, 1, 512, 64), dtype=torch.bfloat16)  # channels-last
        stats = [torch.empty(64) for _ in range(8)]
        for t in (h, *stats[:4]):
            t.requires_grad_()
    out = {
        "pgd_step": summary(graph_targets(pgd, x, x, x)),
        "pgd_step_backend": kernels.last_backend().get("pgd_step"),
        "uniform_start": summary(graph_targets(start, x, seed)),
        "dual_batch_norm_with_grad": summary(graph_targets(dual, h, *stats)),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
