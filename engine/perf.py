"""Every performance switch, applied in one place, in this order, and described in one start-up line.

1. device (auto: CUDA when available);  2. channels-last memory format for the model (the loaders emit it too);
3. fused kernels (PGD step and dual BN; auto: on for CUDA, the dual BN only when compiled; `on` on a CPU uses the
   native library when built);
3b. on a CPU, convolutions with small outputs as matrix products (perf.gemm_conv; 0: off);
4. torch.compile (auto: on for CUDA), static shapes, one compiled entry point per role (training step, attack,
   evaluation, a method's second network), so that switching roles never recompiles;
5. autocast dtype for the forwards (auto: what the hardware runs natively, see `resolve_dtype`);
6. cuDNN autotuning (auto: on for CUDA; every shape in the hot loop is static);
7. CUDA graphs (auto: on for CUDA): each PGD attack captured once and replayed (engine.attacks.graphs).
DDP wrapping happens after these, in engine.distributed.

Hardware-dependent defaults are read from the machine at run time, never tuned to the one they were written on:
on a CPU without native bf16 (e.g. AVX2-only), bf16 autocast is emulated and ran ~10-15x slower than fp32.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .attacks.graphs import AttackGraphs, set_attack_graphs
from .attacks.graphs import for_device as graphs_for_device
from .config import ConfigError, PerfConfig

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"perf.device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):  # e.g. Apple's mps: refused here, before a network or data is loaded
        raise ConfigError(f"device {name}: this engine runs on cpu or cuda (auto picks the GPU where CUDA has one); "
                          "use the CPU (arat train: --set perf.device=cpu; arat eval: --device cpu)")  # fmt: skip
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name} but CUDA is not available here; use the CPU (arat train: --set "
                          "perf.device=cpu; arat eval: --device cpu)")  # fmt: skip
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"perf.device={name} but this process sees {torch.cuda.device_count()} GPU(s): "
                          f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")  # fmt: skip
    return device


def check_built_for(device: torch.device) -> None:
    """Refuse a GPU this torch build has no code for (a CUDA 13 wheel on a V100: sm_70 was dropped), in one line,
    before its first kernel fails with CUDA's "no kernel image is available"."""
    try:
        major, minor = torch.cuda.get_device_capability(device)
        built = torch.cuda.get_arch_list()  # e.g. ["sm_75", "sm_80", ..., "compute_120"]
    except (RuntimeError, AssertionError):  # no driver to ask (a stand-in CUDA): nothing to refuse here
        return
    numbers = [m.groups() for a in built if (m := re.fullmatch(r"(sm|compute)_(\d+)([af]?)", a))]
    arch = 10 * major + minor

    def runs_here(kind: str, number: str, suffix: str) -> bool:
        n = int(number)
        if suffix == "a":  # arch-specific code (sm_90a): that GPU only
            return n == arch
        if kind == "compute":  # PTX, compiled for any later GPU
            return n <= arch
        return n // 10 == major and n <= arch  # a cubin (sm_XY, family sm_XYf): its major at that minor or later

    runs = any(runs_here(*entry) for entry in numbers)
    if numbers and not runs:
        raise ConfigError(
            f"this torch ({torch.__version__}, CUDA {torch.version.cuda}) has no code for this GPU "
            f"({torch.cuda.get_device_name(device)}, sm_{arch}; built for {' '.join(built)}): install a torch wheel "
            "built for it (e.g. an older CUDA's), or use the CPU (--set perf.device=cpu)"
        )


def make_current(device: torch.device) -> None:
    """`device` becomes the current CUDA device: kernels launched from Python (Triton's launcher, the fused ops'
    eager route) run on the current device, not on their tensors', so `perf.device=cuda:1` in one process would
    launch them on GPU 0 (Inductor's generated code guards its device itself). Then a GPU this torch build has no
    code for is refused (`check_built_for`), each process asking its own."""
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    if device.type == "cuda":  # after set_device: torchrun's ranks ask their own GPU, not GPU 0
        check_built_for(device)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX) and oneDNN may use it; elsewhere bf16 is
    emulated. Both are asked: oneDNN's own answer is yes on any AVX-512 CPU (Skylake to Ice Lake emulate bf16 in
    its kernels), and the CPU's flags alone would ignore ONEDNN_MAX_CPU_ISA (a CPU limited to AVX2 on purpose)."""
    try:
        onednn = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        hardware = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return bool(onednn and hardware)
    except (AttributeError, RuntimeError):  # a torch build without the queries: assume emulation (the safe choice)
        return False


def x86_cpu() -> bool:
    """Whether this is an x86 CPU, the only kind cpu_has_native_bf16 can answer yes for (its queries are x86's)."""
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")


def cuda_has_native_bf16(device: torch.device) -> bool:
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_dtype(name: str, device: torch.device) -> tuple[torch.dtype, str]:
    """(autocast dtype, why). auto: bf16 where the device runs it natively; else fp16 with a scaler on CUDA, fp32
    on CPU (CPU fp16 autocast is emulated too)."""
    if name != "auto":
        dtype = DTYPES[name]
        if dtype == torch.bfloat16 and device.type == "cpu" and not cpu_has_native_bf16():
            if not x86_cpu():
                return dtype, "set; bf16 speed on this (non-x86) CPU not measured: time it against perf.dtype=fp32"
            return dtype, "set; WARNING: this CPU emulates bf16 (10-15x slower than fp32): use perf.dtype=auto"
        if dtype == torch.float16 and device.type == "cpu":
            return dtype, "set; WARNING: CPUs compute fp16 autocast slowly (~9x fp32 measured): use perf.dtype=auto"
        if dtype == torch.bfloat16 and device.type == "cuda" and not cuda_has_native_bf16(device):
            return dtype, "set; WARNING: this GPU emulates bf16 (no bf16 tensor cores): use perf.dtype=auto (fp16)"
        return dtype, "set"
    if device.type == "cuda":
        if cuda_has_native_bf16(device):
            return torch.bfloat16, "auto: the GPU has bf16"
        return torch.float16, "auto: the GPU lacks bf16, fp16 with a gradient scaler"
    if cpu_has_native_bf16():
        return torch.bfloat16, "auto: the CPU has native bf16"
    if not x86_cpu():  # an ARM CPU may have bf16 (Neoverse V1/V2, Apple M2+): not measured with this engine
        return torch.float32, "auto: bf16 is detected on x86 CPUs only (AVX512-BF16/AMX); not measured on this CPU"
    return torch.float32, "auto: the CPU has no native bf16 (emulated bf16 is 10-15x slower)"


def resolve_switch(value: str, device: torch.device) -> bool:
    """An auto|on|off switch whose auto means: on for CUDA."""
    return value == "on" or (value == "auto" and device.type == "cuda")


@dataclass
class Perf:
    """The resolved switches a run uses."""

    device: torch.device
    dtype: torch.dtype
    channels_last: bool
    compiled: bool
    kernels: str  # "off" or a description of the active kernel backends
    dtype_reason: str = "set"
    cudnn_benchmark: bool = False
    step_kernel: Callable | None = None  # the PGD step this run installed (None: plain torch)
    attack_graphs: AttackGraphs | None = None  # the captured attacks (None: attacks run eagerly)
    gemm_convs: str = "off"  # perf.gemm_conv as resolved: "off" or which convolutions run as matrix products
    deterministic: bool = False  # perf.deterministic
    any_thread_cpp: bool = False  # compiled with Inductor's C++ for any thread count (one CPU thread: inductor_options)

    @property
    def cuda_graphs(self) -> bool:
        return self.attack_graphs is not None

    def activate(self) -> None:
        """Install this run's PGD step, attack graphs, cuDNN autotuning and deterministic algorithms again (each is
        process-wide: for benchmarks that alternate runs)."""
        from .attacks import set_step_kernel

        set_step_kernel(self.step_kernel)
        set_attack_graphs(self.attack_graphs)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = self.cudnn_benchmark
        if self.deterministic or torch.are_deterministic_algorithms_enabled():  # a deterministic run's, or another's
            set_deterministic(self.deterministic)

    def resolved(self) -> dict[str, object]:
        """The switches as this process resolved them (config.json keeps `auto`): for env.json (and each resume),
        so a run's precision and compilation are on record whatever the hardware made of auto."""
        return {"dtype": DTYPE_NAMES[self.dtype], "channels_last": self.channels_last, "compile": self.compiled,
                "kernels": self.kernels, "cuda_graphs": self.cuda_graphs, "gemm_conv": self.gemm_convs,
                "cudnn_benchmark": self.cudnn_benchmark, "deterministic": self.deterministic}  # fmt: skip

    def autocast(self):
        if self.dtype == torch.float32:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

    def summary(self) -> str:
        hardware = (
            f"cudnn_benchmark={self.cudnn_benchmark}"
            if self.device.type == "cuda"
            else f"threads={torch.get_num_threads()}"
            + (" (compiled C++ for any thread count)" if self.any_thread_cpp else "")
        )
        return (
            f"device={self.device} dtype={DTYPE_NAMES[self.dtype]} ({self.dtype_reason}) "
            f"channels_last={self.channels_last} compile={self.compiled} kernels={self.kernels} "
            f"cuda_graphs={self.cuda_graphs} gemm_conv={self.gemm_convs} {hardware}"
            + (" deterministic" if self.deterministic else "")
        )


def kernels_wanted(value: str, device: torch.device) -> bool:
    """perf.kernels: on, off, or auto = on for CUDA (Triton), off on a CPU. On a CPU the native C++ library is a
    wash: 1.03-1.13x on the demo's step (width 16) and 0.87-1.02x on the full-width ResNet-18 step, on three CPUs
    (docs/kernels.md), so auto leaves it to the user there."""
    return resolve_switch(value, device)


def dual_kernel_wanted(value: str, device: torch.device, compiled: bool) -> bool:
    """Whether Split-BN's dual branch runs the fused dual-BN op: perf.kernels=on, or auto on CUDA when the network
    is compiled. Uncompiled, each Triton launch goes through Python (the custom op, the launcher): on the H200 the
    eager ResNet-18 AR-AT step at batch 128 took 168.6 ms with the fused ops against 93.9 ms without, and the
    dual-BN op's forward + backward 1.6-1.7 ms of wall time per layer against aten's 0.6-0.9 ms (its GPU time inside
    a CUDA graph was 2-3.6x shorter than aten's: launches, not the kernels; docs/gpu.md). The PGD step stays
    fused (107 us of wall time per step against 191 us eagerly)."""
    return kernels_wanted(value, device) and (value == "on" or compiled)


def _install_kernels(
    model: nn.Module, cfg: PerfConfig, device: torch.device, compiled: bool
) -> tuple[str, Callable | None]:
    """(what is active, for the log; the PGD step installed)."""
    from .attacks import set_step_kernel
    from .models import set_dual_kernel

    if not kernels_wanted(cfg.kernels, device):
        set_step_kernel(None)
        set_dual_kernel(model, None)
        return "off", None
    from . import kernels_bridge

    return kernels_bridge.install(model, dual=dual_kernel_wanted(cfg.kernels, device, compiled))


def _install_gemm_convs(model: nn.Module, cfg: PerfConfig, device: torch.device) -> str:
    """perf.gemm_conv on a CPU: the convolutions with small outputs become matrix products (what is active, for the
    log). CUDA keeps cuDNN's convolutions."""
    from .models import set_gemm_convs

    wanted = cfg.gemm_conv if device.type == "cpu" else 0
    names = set_gemm_convs(model, wanted)
    if not names:
        return "off" if cfg.gemm_conv == 0 or device.type == "cpu" else "off (CUDA: cuDNN)"
    return f"{wanted} ({len(names)} convs with outputs <= {wanted}x{wanted})"


class _Role(nn.Module):
    """One role of a network (training step, attack, evaluation) as its own module. torch.compile keeps its graphs
    per code object, and each role subclass has its own `forward`: switching roles (frozen-weight attack forwards,
    the training forward and backward, no-grad evaluation) picks that role's graphs instead of recompiling."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    @property
    def training(self) -> bool:  # a role's mode is its network's: `mode(role, ...)` restores the network's own
        return self.net.training

    @training.setter
    def training(self, value: bool) -> None:
        if "net" in self.__dict__.get("_modules", {}):  # nn.Module.__init__ sets it before `net` exists
            self.net.training = value


class TrainForward(_Role):
    def forward(self, x: torch.Tensor, **kwargs):
        return self.net(x, **kwargs)


class AttackForward(_Role):
    def forward(self, x: torch.Tensor, **kwargs):
        return self.net(x, **kwargs)


class EvalForward(_Role):
    """The deployed classifier: adv-BN branch by default, fp32 logits (what PGD-20 and AutoAttack see)."""

    def forward(self, x: torch.Tensor, bn: str = "adv"):
        return self.net(x, bn=bn).float()


class EvalAttackForward(EvalForward):
    """The classifier as an evaluation attack calls it (input gradients): its own graphs, apart from the no-grad
    predictions'."""

    def forward(self, x: torch.Tensor, bn: str = "adv"):
        return self.net(x, bn=bn).float()


class EvalAutoAttackForward(EvalForward):
    """The classifier as AutoAttack calls it (through evaluate.SubsetBatch, its batch dimension dynamic): graphs of
    its own, so whether PGD-20's static-shape ones exist in the process (PGD-20 ran, or its chunks were all reused
    on a resume) cannot decide which code AutoAttack's batches run."""

    def forward(self, x: torch.Tensor, bn: str = "adv"):
        return self.net(x, bn=bn).float()


class AuxForward(_Role):
    """A method's second network (LBGAT's clean model, ARREST's teacher)."""

    def forward(self, x: torch.Tensor, **kwargs):
        return self.net(x, **kwargs)


INDUCTOR_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # compile modes that capture CUDA graphs themselves


def attack_graphs(cfg: PerfConfig, device: torch.device, reuse: AttackGraphs | None = None) -> AttackGraphs | None:
    """The CUDA graphs attacks on `device` use (None: eager), per perf.cuda_graphs (auto: on for CUDA, off when
    torch.compile's mode captures graphs of its own, which cannot nest inside ours); `reuse`: see graphs.for_device."""
    if cfg.cuda_graphs == "on" and device.type != "cuda":
        raise ConfigError(f"perf.cuda_graphs=on needs a CUDA device, got {device}; use auto or off")
    inductor_graphs = (  # only Inductor reads the mode (inductor_options passes none to the test backends)
        compile_wanted(cfg, device) and cfg.compile_backend == "inductor" and cfg.compile_mode in INDUCTOR_GRAPH_MODES
    )
    if cfg.cuda_graphs == "on" and inductor_graphs:
        raise ConfigError(
            f"perf.cuda_graphs=on and perf.compile_mode={cfg.compile_mode} both capture CUDA graphs; "
            "set one of them off (perf.cuda_graphs=off, or perf.compile_mode=default)"
        )
    if inductor_graphs or not resolve_switch(cfg.cuda_graphs, device):
        return None
    return graphs_for_device(device, reuse)


def compile_wanted(cfg: PerfConfig, device: torch.device) -> bool:
    """perf.compile resolved for `device`; off (said once) where torch.compile misses mode switches, and
    perf.compile=on refused there (compile_misses_mode_switches)."""
    if not resolve_switch(cfg.compile, device):
        return False
    problem = compile_misses_mode_switches()
    if problem is None:
        return True
    if cfg.compile == "on":
        raise ConfigError(problem)
    _say_compile_off(problem)
    return False


@functools.cache
def _say_compile_off(problem: str) -> None:
    logging.getLogger("engine").warning("perf.compile=auto: compiling is off: %s", problem)


def one_thread_cpu(device: torch.device) -> bool:
    """Inductor would generate one-thread C++ for `device`: a CPU with torch at one thread (OMP_NUM_THREADS=1, as
    torchrun sets it, a one-core machine, a background job)."""
    return device.type == "cpu" and torch.get_num_threads() == 1


def inductor_options(cfg: PerfConfig, device: torch.device) -> dict:
    """torch.compile's mode/options for a role. On a CPU at one thread, Inductor's C++ specialised for one thread
    (torch 2.13, AVX-512) returned NaN gradients from the backward of the Split-BN dual forward (ResNet-18; the first
    NaN leaves a fused ReLU-mask / batch-norm-backward kernel; at two threads the gradients are eager's). There it
    compiles with `cpp.dynamic_threads` (code for any thread count, read at run time): eager's gradients, vectorized
    (`cpp.simdlen=1`, also right, ran the step 1.9x slower), except under torch 2.7 (`dynamic_threads_compile`).
    tests/test_perf.py checks a one-thread compiled step."""
    if cfg.compile_backend != "inductor":
        return {}
    if not one_thread_cpu(device):
        return {"mode": cfg.compile_mode} if cfg.compile_mode != "default" else {}
    options = dict(torch._inductor.list_mode_options(cfg.compile_mode)) if cfg.compile_mode != "default" else {}
    if not dynamic_threads_compile():
        return {"options": options} if options else {}
    return {"options": options | {"cpp.dynamic_threads": True}}


def dynamic_threads_compile(version: str = torch.__version__) -> bool:
    """Whether Inductor's C++ for any thread count compiles under this torch. torch 2.7's declares each parallel
    reduction's accumulator array twice (`tmp_acc0_arr[16]`, then `tmp_acc0_arr[max_threads]`: a C++ compile error
    in every compiled step at one thread, torch 2.7.1, 2026-12-07); there the one-thread code runs instead, which gave
    eager's results and gradients under that torch (tests/test_perf.py and tests/test_compile.py). 2.6 and 2.8 on
    compile it."""
    return not version.startswith("2.7.")


class _ModeProbe(nn.Module):
    """A batch norm compiled, run in eval mode, then in train mode (compile_misses_mode_switches)."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x)


@functools.cache
def compile_misses_mode_switches() -> str | None:
    """Why torch.compile cannot be trusted here (None: it can). On Python 3.13.0 (CPython issue 125608: some
    attribute writes leave an object's __dict__ version as it was), torch 2.10's dynamo missed a module's switch from
    eval to train mode: the compiled network went on running its eval-mode graph, and TRADES's and LBGAT's
    running-statistics forward left BN's statistics unchanged (tests/test_compile.py under Python 3.13.0 / torch
    2.10, 2026-12-07; on 3.13.0 torch 2.11.0 misses it too, 2.12.0, 2.13.0 and 2.14.1 see it, as torch 2.10 does on
    Python 3.12; turning dynamo's inline_inbuilt_nn_modules off did not mend the engine's case). Probed on Python
    3.13.0 only, once per process."""
    if sys.version_info[:3] != (3, 13, 0):
        return None
    from torch._dynamo.utils import counters

    module, x = _ModeProbe(), torch.arange(8.0).reshape(4, 2)
    compiled = torch.compile(module, backend="eager", dynamic=False)
    # its two graphs (the switch seen: a recompile) are not the caller's: dynamo's counters (graphs, recompiles, which
    # the GPU check and the benchmarks read) come back as they were, and a caller's recompile errors do not apply
    # (restored in place: a caller may hold counters["stats"]); and two graphs must fit the cache, whatever a
    # caller's limit (at 1 the train-mode call would run eagerly, update the statistics and pass the probe)
    saved = {key: counter.copy() for key, counter in counters.items()}
    limit = max(torch._dynamo.config.cache_size_limit, 8)
    try:
        with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=False, cache_size_limit=limit):
            compiled.eval()
            compiled(x)
            compiled.train()
            compiled(x)
    finally:
        for key in list(counters):
            counters[key].clear()
            if key in saved:
                counters[key].update(saved[key])
            else:
                del counters[key]
    if module.bn.running_mean.abs().sum() > 0:
        return None
    return (f"torch.compile under Python 3.13.0 and torch {torch.__version__} misses a module's switch between eval "
            "and train mode (CPython issue 125608) and would train on wrong BN statistics: use Python 3.13.1+ "
            "(or torch >= 2.12), or perf.compile=off")  # fmt: skip


def compile_role(role: nn.Module, cfg: PerfConfig, device: torch.device) -> nn.Module:
    """torch.compile with static shapes (every shape in the hot loop is fixed; evaluation pads its last batch)."""
    share_compile_workers()  # every compiled role: training's, the evaluation's (`arat eval` under torchrun too)
    return torch.compile(role, dynamic=False, backend=cfg.compile_backend, **inductor_options(cfg, device))


def role(kind: type[_Role], net: nn.Module, cfg: PerfConfig, device: torch.device) -> nn.Module:
    """`net` in role `kind`: compiled when perf.compile resolves on for `device`, else `net` itself."""
    return compile_role(kind(net), cfg, device) if compile_wanted(cfg, device) else net


EVAL_ROLES = {False: EvalForward, True: EvalAttackForward, "autoattack": EvalAutoAttackForward}
ROLES = (TrainForward, AttackForward, AuxForward, *EVAL_ROLES.values())


def forget_compiled_roles() -> None:
    """Drop every role's compiled graphs once a run or an evaluation is done. A role's graphs hang on its class's
    `forward` code object, shared by every run in the process, and dynamo keeps at most `cache_size_limit` graphs
    per code object: a program or notebook running several configurations one after another (a sweep of widths)
    piled them up until a later run's role ran uncompiled (its `eager_frames`; helper-154, the 9th width). The
    on-disk caches keep what was compiled (a configuration run again compiles from them)."""
    reset_code = getattr(getattr(torch._C, "_dynamo", None), "eval_frame", None)
    reset_code = getattr(reset_code, "reset_code", None)
    if reset_code is None:  # (a torch without it: the graphs stay, as before)
        return
    for kind in ROLES:
        reset_code(kind.forward.__code__)


def eval_network(net: nn.Module, cfg: PerfConfig, device: torch.device, attack: bool | str = False) -> nn.Module:
    """The evaluation classifier (adv BN, fp32 logits, bn= selectable), for no-grad predictions, (`attack`) for an
    attack's input gradients or (`attack="autoattack"`) for AutoAttack's, compiled like the training roles when
    perf.compile resolves on."""
    forward = EVAL_ROLES[attack](net)
    return compile_role(forward, cfg, device) if compile_wanted(cfg, device) else forward


def follow(net: nn.Module, cfg: PerfConfig, device: torch.device) -> nn.Module:
    """A method's second network under the run's switches: moved, channels-last, GEMM convolutions, compiled (own
    role)."""
    net.to(device)
    if cfg.channels_last:
        net.to(memory_format=torch.channels_last)
    _install_gemm_convs(net, cfg, device)
    return role(AuxForward, net, cfg, device)


def apply(model: nn.Module, cfg: PerfConfig) -> tuple[nn.Module, nn.Module, Perf]:
    """Move and prepare the model; returns (the training-step network, the attack network, the resolved switches).
    With compile on, the two are separately compiled roles of the same module (shared weights)."""
    device = resolve_device(cfg.device)
    dtype, why = resolve_dtype(cfg.dtype, device)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    on = compile_wanted(cfg, device)
    kernels, step_kernel = _install_kernels(model, cfg, device, on)
    gemm = _install_gemm_convs(model, cfg, device)
    if on:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)  # roles x modes
    train, attack = role(TrainForward, model, cfg, device), role(AttackForward, model, cfg, device)
    benchmark = resolve_switch(cfg.cudnn_benchmark, device) and not cfg.deterministic
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = benchmark  # process-wide: one run per process
    if cfg.deterministic or torch.are_deterministic_algorithms_enabled():  # this run's, or an earlier run's undone
        set_deterministic(cfg.deterministic)  # (a deterministic run before it in this process: recorded off, left on)
    graphs = attack_graphs(cfg, device)
    set_attack_graphs(graphs)
    switches = (device, dtype, cfg.channels_last, on, kernels, why, benchmark, step_kernel, graphs, gemm)
    any_thread = on and "cpp.dynamic_threads" in inductor_options(cfg, device).get("options", {})
    return train, attack, Perf(*switches, cfg.deterministic, any_thread_cpp=any_thread)


def share_compile_workers() -> None:
    """Inductor compiles with up to min(32, cores) worker processes in every process: N torchrun processes on one
    machine started N x cores of them at once, all compiling together (thrashing, or the kernel's OOM killer on a
    small host). Each process takes its share, cores / N (TORCHINDUCTOR_COMPILE_THREADS, when set, decides)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    if local <= 1 or "TORCHINDUCTOR_COMPILE_THREADS" in os.environ:
        return
    import torch._inductor.config as inductor

    # the cores this process may use (its affinity: a container's cpuset), as Inductor counts them
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    share = max(1, cores // local)
    inductor.compile_threads = min(inductor.compile_threads or share, share)


def set_deterministic(on: bool) -> None:
    """perf.deterministic, process-wide (a run's `Perf.activate` sets it again): what would let two processes compute
    a step in other kernels, or other summation orders, is pinned. cuDNN's deterministic algorithms, not timed
    (autotuning times each process's own: some weight-gradient algorithms sum with atomics); torch's deterministic
    algorithms (an op without one warns once); Inductor's deterministic mode (it times no configs on the device, and
    keeps reductions in a fixed order); cuBLAS's fixed workspace, read when its handle is made (at the first matrix
    product: it stays once made). Off undoes the first three."""
    import torch._inductor.config

    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = on
    torch.use_deterministic_algorithms(on, warn_only=True)
    if hasattr(torch._inductor.config, "deterministic"):  # torch >= 2.10
        torch._inductor.config.deterministic = on


def gpu_model(device_name: str, models) -> str | None:
    """The first of `models` (names such as "H100 PCIe", most specific first) that `device_name` holds as whole words
    ("NVIDIA H100 PCIe"; an "RTX A1000" is not an A100, a "GH200" not an H200); None for any other GPU, and for a MIG
    slice (a fraction of the whole GPU: no figure of the whole GPU holds for it)."""
    words = f" {device_name.replace('-', ' ')} "
    if " MIG " in words:
        return None
    return next((k for k in models if f" {k} " in words), None)


# dense bf16 datasheet peaks; the PCIe and NVL H100s (lower clocks and power) before the SXM one
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0}


@functools.cache
def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak for known GPUs (for achieved-TFLOP/s ratios in benchmarks); None for any other, and for a
    MIG slice."""
    model = gpu_model(device_name, PEAK_TFLOPS)
    return PEAK_TFLOPS[model] if model else None


def forward_flops(model: nn.Module, x: torch.Tensor) -> float:
    """F: forward FLOPs per image (adv branch, eval mode), counted by FlopCounterMode on `x`. No statistics change,
    no randomness drawn."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x, bn="adv")
    finally:
        model.train(was_training)
    return counter.get_total_flops() / len(x)


def arat_step_flops(model: nn.Module, attack_steps: int, device: torch.device) -> float:
    """METHOD 9's cost of one AR-AT image-step in FLOPs: (2 x attack steps + 6) forward units F (bench/cost_model.py's
    forward_units), F counted on one image."""
    return forward_flops(model, torch.zeros(1, 3, 32, 32, device=device)) * (2 * attack_steps + 6)


def dynamo_counts() -> dict[str, int]:
    """torch.compile's graphs built, graph breaks and frames given up on so far in this process (cheap: dynamo's own
    counters). A frame dynamo gives up on (its recompile limit hit, or an error it falls back from) builds no graph
    and breaks none, and from then on runs eagerly without a word: only `eager_frames` counts it."""
    from torch._dynamo.utils import counters

    frames = counters["frames"]
    return {
        "graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
        "eager_frames": frames["total"] - frames["ok"],
    }  # fmt: skip
