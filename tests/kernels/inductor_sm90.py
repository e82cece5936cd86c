"""Compiles the fused ops' triton_op graphs through Inductor for sm_90 on a machine without a GPU, and prints, as
JSON, every Triton kernel Inductor compiled (its own and the user-defined ones). Run by test_aot.py in a subprocess
without TRITON_INTERPRET.

What this reaches that the ahead-of-time compile (kernels/aot.py) does not: Inductor's own launch of a user-defined
kernel (its signature types a Python float as fp64, which failed every compiled step with the kernels on the H200,
2026-12-04) and its code around the kernels. How: fake CUDA tensors, the graphs traced as AOTAutograd traces them
(functionalized make_fx), then `compile_fx_inner`, with the device queries answered by a stand-in for an H200 (sm_90,
132 SMs) and Triton's driver by a stub that names the target; kernels are compiled to cubins and never loaded or
run (no launchers are made). Forward graphs only: a backward through autograd asks the CUDA runtime about the
device, so the backward op is traced as a plain call. Nothing here says the kernels are right or fast: the GPU check
does.
"""

from __future__ import annotations

import json
import logging
import os
import types

os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = "1"  # compile in this process, where the stand-ins are installed
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import torch._subclasses.fake_tensor as fake_tensor  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch._subclasses.functional_tensor import FunctionalTensorMode, dispatch_functionalize  # noqa: E402
from torch.fx.experimental.proxy_tensor import make_fx  # noqa: E402

H200 = types.SimpleNamespace(
    name="NVIDIA H200 (stand-in)", major=9, minor=0, multi_processor_count=132, total_memory=140 * 2**30,
    warp_size=32, max_threads_per_multi_processor=2048, regs_per_multiprocessor=65536, L2_cache_size=60 * 2**20,
    shared_memory_per_block_optin=232448, gcnArchName="", uuid="stand-in",
)  # fmt: skip
COMPILED: list[str] = []


def install_stand_ins() -> None:
    """Device queries answered for an H200; nothing that would need a driver is called."""
    cuda = torch.cuda
    cuda.is_available, cuda.device_count, cuda.current_device = (lambda: True), (lambda: 1), (lambda: 0)
    cuda.get_device_properties = lambda *args, **kwargs: H200
    cuda.get_device_capability = lambda *args, **kwargs: (H200.major, H200.minor)
    cuda.get_device_name = lambda *args, **kwargs: H200.name
    cuda.is_bf16_supported = lambda *args, **kwargs: True
    cuda.get_rng_state = lambda *args, **kwargs: torch.zeros(16, dtype=torch.uint8)
    # one function per name: Dynamo's trace rules refuse one object under two torch names
    cuda.set_rng_state = lambda *args, **kwargs: None
    cuda.synchronize = lambda *args, **kwargs: None
    cuda.set_device = lambda *args, **kwargs: None
    cuda._exchange_device = lambda index: 0
    cuda._maybe_exchange_device = lambda index: 0
    if not hasattr(torch._C, "_cuda_getCurrentRawStream"):  # a CPU wheel
        torch._C._cuda_getCurrentRawStream = lambda index: 0
    fake_tensor.init_gpu_context = lambda device: None  # it would allocate on the device

    import triton
    from triton.backends.compiler import GPUTarget

    class StubDriver:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cuda", 0)

        def get_device_interface(self):
            return torch.cuda

        def is_active(self):
            return True

    triton.runtime.driver.set_active(StubDriver())
    import torch._inductor.runtime.triton_helpers as helpers
    import torch._inductor.runtime.triton_heuristics as heuristics

    helpers.set_driver_to_gpu = lambda: None
    compile_config = heuristics.CachingAutotuner._precompile_config

    def logged(self, config):
        result = compile_config(self, config)
        COMPILED.append(self.fn.__name__)
        return result

    heuristics.CachingAutotuner._precompile_config = logged
    heuristics.CachingAutotuner._make_launchers = lambda self: None  # loading a cubin needs the driver


def compile_graph(fn, *args) -> None:
    """Trace fn as AOTAutograd does and compile the graph with Inductor for the stand-in device."""
    from torch._inductor.compile_fx import compile_fx_inner

    with args[0].fake_mode:
        graph = make_fx(dispatch_functionalize(fn, mode=FunctionalTensorMode()), tracing_mode="real")(*args)
        compile_fx_inner(graph, list(args))


def main() -> None:
    install_stand_ins()
    import kernels
    from kernels import _triton_util

    assert kernels.load_triton_ops(), "needs triton importable and TRITON_INTERPRET unset"
    from kernels.dual_bn.triton_impl import dual_bn_backward_op, dual_bn_op
    from kernels.pgd_step.triton_impl import pgd_step_op, uniform_start_op

    _triton_util._sm_count = lambda index: H200.multi_processor_count
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
    graphs = {}
    for name, fn, args in (("pgd", pgd, (x, x, x, seed)), ("dual_bn forward", forward, (h, *params)),
                           ("dual_bn backward", backward, (h, h, h, params[0], params[2], *stats))):  # fmt: skip
        start = len(COMPILED)
        compile_graph(fn, *args)
        graphs[name] = COMPILED[start:]
    print(json.dumps({"torch": torch.__version__, "graphs": graphs}))


if __name__ == "__main__":
    main()
