"""Compiles the engine's networks through Inductor for sm_90 on a machine without a GPU (tests/fake_cuda.py) and
prints, as JSON, per graph: how many Triton kernels were compiled and which user-defined ones among them. Run by
test_inductor_sm90.py in a subprocess without TRITON_INTERPRET.

Graphs, as the compiled roles run them on CUDA by default: the training forward (Split-BN's dual branch over a batch
of 2B in train mode, bf16 autocast, channels-last, the fused dual BN as engine.perf installs it when compiled; under
no_grad, since a backward cannot be traced here), the evaluation forward (adv BN, eval mode, fp32 logits; in
Inductor's deterministic mode, as the evaluation compiles it), and the same forward with a symbolic batch, as
AutoAttack's role compiles it (engine.evaluate.SubsetBatch marks the batch dynamic: one graph for every subset).
Usage: python tests/inductor_sm90_network.py [resnet18|wrn34-10] [width] [batch]
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/: fake_cuda
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the repository: engine, kernels

import fake_cuda  # noqa: E402  (first: it sets the compile environment before torch is imported)
import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.func import functional_call  # noqa: E402
from torch.fx.experimental.symbolic_shapes import ShapeEnv  # noqa: E402


def fake_state(model: torch.nn.Module, mode: FakeTensorMode) -> dict[str, torch.Tensor]:
    """The model's parameters and buffers as fake CUDA tensors of the same shapes, strides and dtypes."""
    real = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    with mode:
        return {k: torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="cuda") for k, v in real.items()}


def main(arch: str = "resnet18", width: int = 64, batch: int = 128) -> None:
    fake_cuda.install_stand_ins()
    import kernels
    from engine import kernels_bridge
    from engine.config import ModelConfig
    from engine.evaluate import repeatable_kernels
    from engine.models import build_model
    from kernels import _triton_util

    assert kernels.load_triton_ops(), "needs triton importable and TRITON_INTERPRET unset"
    _triton_util._sm_count = lambda index: fake_cuda.H200.multi_processor_count
    logging.getLogger("torch._inductor").setLevel(logging.CRITICAL)  # a failure is raised, not only logged
    model = build_model(ModelConfig(arch=arch, width=width), 10).to(memory_format=torch.channels_last)
    kernels_bridge.install(model, dual=True)  # what engine.perf installs for a compiled network on CUDA
    mode = FakeTensorMode()
    state = fake_state(model, mode)
    names = list(state)
    with mode:
        x = torch.empty(2 * batch, 3, 32, 32, device="cuda").to(memory_format=torch.channels_last)

    def train_forward(*args):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            return (functional_call(model.train(), dict(zip(names, args[:-1], strict=True)), (args[-1],),
                                    {"bn": "dual"}),)  # fmt: skip

    def eval_forward(*args):
        with torch.no_grad():
            return (functional_call(model.eval(), dict(zip(names, args[:-1], strict=True)), (args[-1],),
                                    {"bn": "adv"}).float(),)  # fmt: skip

    graphs = {}
    for name, fn in (("train forward", train_forward), ("eval forward", eval_forward)):
        # the evaluation compiles under engine.evaluate.repeatable_kernels (Inductor's deterministic mode)
        pinned = repeatable_kernels() if name == "eval forward" else contextlib.nullcontext()
        with pinned:
            compiled = fake_cuda.compile_graph(fn, *state.values(), x)
        graphs[name] = {"kernels": len(compiled), "user": sorted({k for k in compiled if not k.startswith("triton_")})}
    # AutoAttack's role: the evaluation forward over a batch whose size is a symbol (a mode with a ShapeEnv)
    symbolic = FakeTensorMode(shape_env=ShapeEnv())
    state = fake_state(model, symbolic)
    xs = fake_cuda.symbolic_batch(symbolic, (batch, 3, 32, 32), (3 * 32 * 32, 1, 32 * 3, 3))  # channels-last
    with repeatable_kernels():
        compiled = fake_cuda.compile_graph(eval_forward, *state.values(), xs, tracing_mode="symbolic")
    graphs["autoattack forward, symbolic batch"] = {
        "kernels": len(compiled), "user": sorted({k for k in compiled if not k.startswith("triton_")}),
        "batch": str(xs.shape[0]),
    }  # fmt: skip
    print(json.dumps({"torch": torch.__version__, "arch": arch, "width": width, "graphs": graphs}))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "resnet18", *(int(a) for a in sys.argv[2:4]))
