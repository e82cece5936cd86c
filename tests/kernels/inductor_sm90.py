"""Compiles the fused ops' triton_op graphs through Inductor for sm_90 on a machine without a GPU (tests/fake_cuda.py)
and prints, as JSON, the Triton kernels compiled per graph. Run by test_aot.py in a subprocess without
TRITON_INTERPRET. What the ahead-of-time compile (kernels/aot.py) does not reach: Inductor's own launch of a
user-defined kernel (its signature types a Python float as fp64, which failed every compiled step with the kernels
on the H200, 2026-12-04) and its code around the kernels. The backward op is traced as a plain call.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: fake_cuda

import fake_cuda  # noqa: E402  (first: it sets the compile environment before torch is imported)
import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402


def main() -> None:
    fake_cuda.install_stand_ins()
    import kernels
    from kernels import _triton_util

    assert kernels.load_triton_ops(), "needs triton importable and TRITON_INTERPRET unset"
    from kernels.dual_bn.triton_impl import dual_bn_backward_op, dual_bn_op
    from kernels.pgd_step.triton_impl import pgd_step_op, uniform_start_op

    _triton_util._sm_count = lambda index: fake_cuda.H200.multi_processor_count
    logging.getLogger("torch._inductor").setLevel(logging.CRITICAL)  # a failure is raised, not only logged

    def pgd(x, x_adv, grad, seed):
        return (pgd_step_op(uniform_start_op(x, 8 / 255, seed), x_adv, grad * 2.0, 8 / 255, 2 / 255),)

    def forward(x, *params):
        y, mean, var = dual_bn_op(x, *params, True, 1e-5, True)
        return y * 2.0, mean, var

    def backward(grad_y, x, y, clean_weight, adv_weight, mean, var):
        return dual_bn_backward_op(grad_y * 2.0, x, y, clean_weight, adv_weight, mean, var, True, 1e-5, True)

    with FakeTensorMode():
        x = torch.empty(8, 3, 32, 32, device="cuda").to(memory_format=torch.channels_last)
        seed = torch.empty(1, device="cuda", dtype=torch.int64)
        h = torch.empty_strided((16, 64, 8, 8), (4096, 1, 512, 64), dtype=torch.bfloat16, device="cuda")
        params = [torch.empty(64, device="cuda") for _ in range(8)]
        stats = [torch.empty(2, 64, device="cuda") for _ in range(2)]
    cases = {
        "pgd": (pgd, (x, x, x, seed)),
        "dual_bn forward": (forward, (h, *params)),
        "dual_bn backward": (backward, (h, h, h, params[0], params[2], *stats)),
    }
    graphs = {name: fake_cuda.compile_graph(fn, *args) for name, (fn, args) in cases.items()}
    print(json.dumps({"torch": torch.__version__, "graphs": graphs}))


if __name__ == "__main__":
    main()
