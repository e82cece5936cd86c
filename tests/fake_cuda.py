"""Compiling with Inductor for an H200 (sm_90) on a machine without a GPU: fake CUDA tensors, device queries
answered by a stand-in H200 (sm_90, 132 SMs), Triton's driver replaced by a stub that names the target. Graphs are
traced as AOTAutograd traces them (functionalized make_fx with Inductor's decompositions) and compiled by
`compile_fx_inner`: Inductor generates its code, and Triton compiles every kernel (Inductor's own and the
user-defined ones it launches) to sm_90 cubins, which are never loaded or run (no launchers are made).

Used by tests/kernels/inductor_sm90.py (the fused ops' graphs) and tests/inductor_sm90_network.py (the engine's
network), each in a subprocess of its test: install_stand_ins() changes torch.cuda for the whole process.

Runs under torch 2.6 too (2026-12-07): there a fake CUDA convolution asks the CUDA runtime for its backend (answered
here with cuDNN's), wrap_triton makes a launch's num_warps a Triton autotuner (the stub driver has a benchmarker that
is never called) and Inductor's precompile loads each binary unless told to warm the cache only (told so here).

Limits: forward graphs only (a backward through autograd asks the CUDA runtime about the device), and no Python
indexing of a fake CUDA tensor (`x[i]` takes a device guard; `x.select(0, i)` does not). Nothing here says a kernel
is right or fast: the GPU check does (docs/gpu.md). Added after the H200's first check (2026-12-04) failed every
compiled step on an fp64 argument that no CPU test had reached.
"""

from __future__ import annotations

import os
import types

os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = "1"  # compile in this process, where the stand-ins are installed
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import torch._subclasses.fake_tensor as fake_tensor  # noqa: E402
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
    select_conv_backend = torch._C._select_conv_backend

    def conv_backend(*args, **kwargs):  # torch 2.6's CUDA build asks the CUDA runtime (no driver here)
        try:
            return select_conv_backend(*args, **kwargs)
        except RuntimeError as e:
            if "CUDA driver" not in str(e):
                raise
            return torch._C._ConvBackend.Cudnn  # what the H200 runs a convolution with

    torch._C._select_conv_backend = conv_backend

    install_triton_stub()
    import torch._inductor.runtime.triton_helpers as helpers
    import torch._inductor.runtime.triton_heuristics as heuristics

    helpers.set_driver_to_gpu = lambda: None
    compile_config = heuristics.CachingAutotuner._precompile_config

    def logged(self, config, *warm_cache_only):
        # torch 2.6 passes warm_cache_only, and loads the binary unless it is true: compile only
        result = compile_config(self, config, *(True for _ in warm_cache_only))
        COMPILED.append(self.fn.__name__)
        return result

    heuristics.CachingAutotuner._precompile_config = logged
    heuristics.CachingAutotuner._make_launchers = lambda self: None  # loading a cubin needs the driver


def install_triton_stub() -> None:
    """Triton's driver replaced by a stub naming an sm_90 target (no GPU driver here)."""
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

        def get_benchmarker(self):  # torch 2.6's wrap_triton wraps a launch's num_warps in an autotuner, which
            def never(*args, **kwargs):  # asks for this when made; nothing is timed here
                raise RuntimeError("the stand-in H200 runs nothing")

            return never

    triton.runtime.driver.set_active(StubDriver())


def compile_graph(fn, *args, tracing_mode: str = "real") -> list[str]:
    """Trace fn (returning a tuple of tensors) as AOTAutograd does and compile the graph with Inductor for the
    stand-in device; returns the names of the kernels Triton compiled for it. `tracing_mode="symbolic"` keeps the
    inputs' symbolic sizes (fake tensors of a mode with a ShapeEnv: `symbolic_batch`) symbolic in the graph."""
    from torch._inductor.compile_fx import compile_fx_inner
    from torch._inductor.decomposition import select_decomp_table

    start = len(COMPILED)
    traced = dispatch_functionalize(fn, mode=FunctionalTensorMode())
    with args[0].fake_mode:
        graph = make_fx(traced, decomposition_table=select_decomp_table(), tracing_mode=tracing_mode)(*args)
        compile_fx_inner(graph, list(args))
    return COMPILED[start:]


def symbolic_batch(mode, shape: tuple[int, ...], stride: tuple[int, ...], hint: int = 8) -> torch.Tensor:
    """A fake CUDA tensor of `mode` (which has a ShapeEnv) whose first dimension is a symbol (hint `hint`), as
    dynamo makes a dimension marked dynamic; `stride` must not depend on that dimension (e.g. channels-last)."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic

    env = mode.shape_env
    batch = env.create_symintnode(env.create_symbol(hint, ConstantSource("batch"), DimDynamic.DYNAMIC), hint=hint)
    with mode:
        return torch.empty_strided((batch, *shape[1:]), stride, device="cuda")
