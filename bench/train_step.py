"""Training-step throughput, feature by feature: images/s, step time, attack cost, achieved TFLOP/s, ops per step.

The switch ladder (fp32 eager -> channels-last -> bf16 autocast -> dual forward -> fused kernels -> cudnn.benchmark
-> CUDA graphs of the attack -> GEMM small convolutions (CPU) -> torch.compile) runs on the same AR-AT step (PGD
attack + clean/adv forwards + SGD step). Two orders (and `--compare`, `--direct` for one switch or one row):

- greedy (default): each switch is tried on top of the fastest configuration so far, the two timed interleaved in
  one process (round after round), and kept only if it is faster; so the ladder follows what is fastest on the
  machine at hand (on a CPU without native bf16, bf16 autocast is dropped). Then each switch dropped before a later
  one was kept is tried once more, "(again)", on the configuration then fastest (a loss eagerly can win compiled).
  `vs_fp32_eager` chains the kept ratios; a last row, "(direct vs fp32 eager)", times the fastest configuration
  against a fresh fp32 eager row interleaved, one ratio whose noise does not compound.
- cumulative (`--cumulative`): every switch on top of the previous row, all rows interleaved (the GPU check's view).

Per row also: the warm-up's seconds (`--warmup` steps and attacks; compiling, for compiled rows), aten ops
dispatched per step (top-level, from the profiler; compiled code counts the ops its kernels call), and for compiled
rows the graphs compiled, recompiles after warm-up and graph breaks (torch._dynamo's counters); on CUDA the kernels
launched per step and the GPU-busy fraction (the time some kernel runs / the step's wall time, one profiled step;
well below 1: the GPU waits on Python and launches). FLOPs follow METHOD 9 (bench/cost_model.py): per image and
step, (2 * attack steps + 6) forward passes F, with F counted by torch.utils.flop_counter on the network itself;
from them TFLOP/s, the fraction of the device's datasheet peak (CUDA), the % of a matrix-product ceiling measured at
the start of the run (bf16 on CUDA and on CPUs with native bf16, fp32 elsewhere), and the projected seconds per
epoch and minutes per 100 epochs of the full training set at the row's batch size. Also measured at the start: the
network's own convolutions alone in fp32 and in the device's native lower precision (`conv_ceiling_tflops`; each
row's `pct_conv_ceiling` of its dtype's), and a summary line bounds the ladder with them (the fastest dtype's
convolution rate over the fp32 eager row's TFLOP/s).

    python bench/train_step.py --quick                      # CPU-sized: ResNet-18 width 16, batch 64, PGD-5
    python bench/train_step.py --width 64 --batch-size 32   # the issue's CPU figure: the real ResNet-18 at batch 32
    python bench/train_step.py --batch-size 128 --steps 20 --cumulative                  # the real network (GPU)
    python bench/train_step.py --train-epochs 2 --data-dir data                 # plus accuracy after a short run
    python bench/train_step.py --width 16 --batch-size 64 --attack-steps 3 --rounds 9 \
        --set perf.dtype=fp32 --compare perf.kernels=off,on                      # one switch, the demo's step
    python bench/train_step.py --width 64 --batch-size 32 --rounds 9 \
        --direct perf.channels_last=true,perf.dtype=bf16,perf.compile=on,perf.gemm_conv=8   # one row vs fp32 eager

Rows go to --out (JSON lines) with the CPU model and whether it runs bf16 natively; a markdown table is printed.
Take figures on a quiet machine (one torch job).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch._dynamo
from cost_model import derived, epoch_images, forward_units
from harness import append_jsonl, markdown_table, positive_int, provenance, run_cli

from engine.analysis import keep_saved_tensors
from engine.attacks.graphs import active as active_attack_graphs
from engine.attacks.graphs import set_attack_graphs
from engine.config import TrainConfig, apply_overrides
from engine.errors import UserError
from engine.methods.arat import attack_inputs
from engine.models import build_model
from engine.perf import dynamo_counts as engine_dynamo_counts
from engine.perf import forward_flops, peak_tflops, resolve_device, resolve_dtype
from engine.recipes import get_recipe
from engine.train import Run, build_run, train_step

LADDER = [
    (
        "fp32 eager",
        [
            "perf.dtype=fp32",
            "perf.channels_last=false",
            "perf.dual_forward=false",
            "perf.kernels=off",
            "perf.cudnn_benchmark=off",
            "perf.compile=off",
            "perf.cuda_graphs=off",
            "perf.gemm_conv=0",
        ],
    ),
    ("+channels-last", ["perf.channels_last=true"]),
    ("+bf16 autocast", ["perf.dtype=bf16"]),
    ("+dual forward", ["perf.dual_forward=true"]),
    ("+fused kernels", ["perf.kernels=on"]),
    ("+cudnn.benchmark", ["perf.cudnn_benchmark=on"]),  # CUDA only: a no-op on CPU
    ("+CUDA graphs", ["perf.cuda_graphs=on"]),  # CUDA only: each attack captured once, replayed
    ("+GEMM small convs", ["perf.gemm_conv=8"]),  # CPU only: ResNet-18 layer3+4 convolutions as matrix products
    ("+torch.compile", ["perf.compile=on"]),
]
CUDA_ONLY = {"+cudnn.benchmark", "+CUDA graphs"}
CPU_ONLY = {"+GEMM small convs"}
LADDER_KEYS = {switch.partition("=")[0] for _, switches in LADDER for switch in switches}
CEILING: dict = {}  # matmul_ceiling() and conv_ceiling(), measured once at the start of main()
CONV_ROUNDS = 3  # conv_ceiling's rounds over every convolution (its figure: each one's best)


def applies(rung: str, device_type: str) -> bool:
    """Whether a ladder rung means anything on this device type (the others are skipped)."""
    return rung not in (CPU_ONLY if device_type == "cuda" else CUDA_ONLY)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ms_per_call(fn, calls: int, device: torch.device) -> float:
    """`calls` back-to-back calls and one sync: wall ms per call (what a training loop sees; the GPU check's steps)."""
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - start) * 1e3 / calls


def median_ms(fn, device: torch.device, reps: int) -> float:
    """Wall time of `fn` in ms. On a CPU the median of `reps` calls; on CUDA `ms_per_call` over `reps` calls (a
    sync after each would leave the GPU idle while the next call's first kernels are launched, which a training
    loop never does)."""
    if device.type == "cuda":
        return ms_per_call(fn, reps, device)
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def profiled(fn, device: torch.device, calls: int = 1) -> tuple[list, float]:
    """The profiler's events of `calls` back-to-back calls of fn (CPU ops, and on CUDA the device's kernels) and
    their wall time in microseconds (lengthened by the profiler's own cost)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        sync(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        wall_us = (time.perf_counter() - start) * 1e6
    return list(prof.events()), wall_us


def aten_events(events) -> list:
    """The host-side aten ops among profiler events (nested ones included: see inside_aten)."""
    return [e for e in events if e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith("aten::")]


def profile_call(fn, device: torch.device, call_ms: float | None = None) -> dict:
    """One profiled call of `fn`: top-level aten ops dispatched (an op called inside another op is not counted
    again); on CUDA also the kernels launched and the GPU-busy fraction (the union of the kernels' time intervals,
    overlapping kernels counted once, over the unprofiled `call_ms` where given, else over the profiled call's wall
    time, which the profiler's own cost lengthens)."""
    events, wall_us = profiled(fn, device)
    ops = sum(not inside_aten(e) for e in aten_events(events))
    if device.type != "cuda":
        return {"ops_per_step": ops, "kernels_per_step": None, "launches_per_step": None, "busy_fraction": None}
    return {"ops_per_step": ops} | kernel_figures(events, wall_us, step_ms=call_ms)


def device_events(events) -> list:
    """The profiler's device-side events (kernels, copies), less the GPU copies of record_function ranges (they
    would count time twice)."""
    return [
        e
        for e in events
        if e.device_type != torch.autograd.DeviceType.CPU and not getattr(e, "is_user_annotation", False)
    ]


KERNEL_LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
GRAPH_LAUNCHES = ("cudaGraphLaunch", "cuGraphLaunch")


def kernel_figures(events, wall_us: float, steps: int = 1, step_ms: float | None = None) -> dict:
    """Per step, from the profiler events of `steps` steps taking `wall_us` profiled: the kernels the GPU executed
    (memory copies and sets not counted; a CUDA graph's replay executes every kernel it holds), the host's kernel
    launches and graph launches (what a captured attack saves: one graph launch for its kernels), and the GPU-busy
    fraction (kernels and copies), of the unprofiled time `steps` x `step_ms` where the caller has it (the profiler's
    own cost lengthens a profiled step)."""
    if step_ms:
        wall_us = steps * step_ms * 1e3
    device = device_events(events)
    busy = busy_us([(e.time_range.start, e.time_range.end) for e in device])  # overlapping events count once
    kernels = [e for e in device if not e.name.startswith(("Memcpy", "Memset"))]
    host = [e.name for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    return {
        "kernels_per_step": round(len(kernels) / steps),
        "launches_per_step": round(sum(name in KERNEL_LAUNCHES for name in host) / steps),
        "graph_launches_per_step": round(sum(name in GRAPH_LAUNCHES for name in host) / steps, 2),
        "busy_fraction": round(min(busy / wall_us, 1.0), 3) if wall_us else None,
    }


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of (start, end) intervals: time in which at least one of them runs."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


def matmul_ceiling(device: torch.device) -> dict:
    """The machine's matrix-product throughput in TFLOP/s, the ceiling each row is a % of: bf16 where the device
    has it natively, else what perf.dtype=auto picks there (fp16 on such a GPU, fp32 on such a CPU: emulated bf16
    is no ceiling); 8192^3 on CUDA, 2048^3 on a CPU."""
    dtype, n = resolve_dtype("auto", device)[0], 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    per_call = 10 if device.type == "cuda" else 1  # back to back between syncs: a ~1.4 ms product, not its launch
    products = lambda: [a @ b for _ in range(per_call)]  # noqa: E731
    ms = min(median_ms(products, device, 3) for _ in range(2)) / per_call  # the first median includes warm-up
    case = f"{str(dtype).removeprefix('torch.')} {n}^3"
    return {"matmul_ceiling_tflops": round(2 * n**3 / ms / 1e9, 3), "matmul_ceiling_case": case}


def network_convs(model: torch.nn.Module, batch: int, device: torch.device) -> Counter:
    """The distinct convolutions one forward of `model` (adv branch) runs at `batch`, as (input shape, weight shape,
    stride, padding, dilation, groups) -> how many times."""
    convs: Counter = Counter()

    def seen(module: torch.nn.Conv2d, inputs: tuple, _output) -> None:
        convs[(tuple(inputs[0].shape), tuple(module.weight.shape), *conv_args(module))] += 1

    hooks = [m.register_forward_hook(seen) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(batch, 3, 32, 32, device=device), bn="adv")
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return convs


def conv_args(module: torch.nn.Conv2d) -> tuple:
    return module.stride, module.padding, module.dilation, module.groups


def conv_flops(out_shape: tuple, weight_shape: tuple) -> int:
    """One forward pass of a convolution: 2 x multiply-adds (each output element: in-channels/groups x kernel)."""
    return 2 * math.prod(out_shape) * math.prod(weight_shape[1:])


def captured(fn):
    """fn captured as a CUDA graph (warmed on a side stream, as torch's graph docs do): its replay, which launches
    the passes' kernels without Python in between (a ceiling of the GPU's work, not of the host's launches).
    CUDA only; not yet run on a GPU."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()

    def replay(fn=fn) -> None:  # holds fn, whose defaults hold the inputs the graph reads: a graph keeps only their
        graph.replay()  # addresses, and freed they would be replayed from reused memory

    return replay


def conv_ceiling(cfg: TrainConfig, device: torch.device) -> dict:
    """The network's own convolutions alone, per dtype: each distinct one run forward and back to its input (the
    attack's passes, most of a step) at the row's batch in channels-last, its best of CONV_ROUNDS rounds, weighted by
    how often the network runs it. Their TFLOP/s is about the most a step of that dtype could reach on this device
    if nothing but its convolutions ran (no batch norm, no activation, no Python), so the fastest dtype's figure over
    the fp32 eager row's TFLOP/s bounds what the ladder can gain here (ladder_bound): on a CPU whose bf16
    convolutions run 2x its fp32 ones, a 3x ladder would have to compute less. fp32, and the lower precision
    perf.dtype=auto picks where the device runs it natively (bf16; fp16 on a GPU without bf16). On CUDA: cuDNN's
    autotuned algorithms, fp32 with TF32 as torch allows it by default (as the ladder's fp32 rows run), each pass
    captured as a CUDA graph and replayed (not yet run on a GPU)."""
    model = build_model(cfg.model, cfg.data.num_classes).to(device)
    convs = network_convs(model, cfg.batch_size, device)
    del model
    low = resolve_dtype("auto", device)[0]  # what perf.dtype=auto runs there (fp32 on a CPU without native bf16)
    dtypes = [torch.float32] + ([low] if low != torch.float32 else [])
    autotuning = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True  # the ceiling: cuDNN's fastest algorithms (a no-op on a CPU)
    try:
        return measured_convs(convs, dtypes, device, cfg.batch_size)
    finally:
        torch.backends.cudnn.benchmark = autotuning  # the rows set their own (perf.cudnn_benchmark)


def measured_convs(convs: Counter, dtypes: list[torch.dtype], device: torch.device, batch: int) -> dict:
    generator, cases = torch.Generator(device).manual_seed(0), []  # (dtype, count, FLOPs, the passes)
    for dtype in dtypes:
        make = lambda size, dtype=dtype: torch.randn(size, generator=generator, device=device, dtype=dtype)  # noqa: E731
        for (shape, weight_shape, *args), count in convs.items():
            x = make(shape).to(memory_format=torch.channels_last).requires_grad_()
            w = make(weight_shape).to(memory_format=torch.channels_last)
            grad = make(torch.nn.functional.conv2d(x, w, None, *args).shape).to(memory_format=torch.channels_last)

            def passes(x=x, w=w, grad=grad, args=args) -> None:
                torch.autograd.grad(torch.nn.functional.conv2d(x, w, None, *args), x, grad)

            passes()  # oneDNN / cuDNN pick and cache their algorithm
            if device.type == "cuda":  # a layer4 pass is ~20 us of GPU work at B=128, less than its Python launch
                passes = captured(passes)
            cases.append((dtype, count, 2 * conv_flops(grad.shape, weight_shape), passes))  # forward + input gradient
    # a ceiling: each convolution's best of CONV_ROUNDS rounds (a busy moment only slows one down), the dtypes taking
    # turns so that a slow stretch of the machine does not fall on one of them
    best = [math.inf] * len(cases)
    for _ in range(CONV_ROUNDS):
        for i, (*_, passes) in enumerate(cases):
            best[i] = min(best[i], median_ms(passes, device, 3 if device.type == "cpu" else 20))
    figures = {}
    for dtype in dtypes:
        mine = [(count, flops, ms) for (d, count, flops, _), ms in zip(cases, best, strict=True) if d == dtype]
        total_flops, total_ms = sum(c * f for c, f, _ in mine), sum(c * ms for c, _, ms in mine)
        figures[str(dtype).removeprefix("torch.")] = round(total_flops / total_ms / 1e9, 3)
    return {
        "conv_ceiling_tflops": figures,
        "conv_ceiling_case": f"{sum(convs.values())} convolutions, batch {batch}, forward + input gradient",
    }


def inside_aten(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def dynamo_counts() -> Counter:
    """torch._dynamo's running totals: graphs compiled, graph breaks and frames given up on (all compiled functions
    of the process), as a Counter (rows subtract them)."""
    return Counter(engine_dynamo_counts())


@dataclass
class Row:
    name: str
    cfg: TrainConfig
    run: Run
    x: torch.Tensor
    y: torch.Tensor
    warm: Counter = field(default_factory=Counter)  # dynamo counts after this row's warm-up
    timed: Counter = field(default_factory=Counter)  # dynamo counts during its timed calls (recompiles: none wanted)
    warmup_s: float = 0.0  # the warm-up steps and attacks, compiling included
    step_ms: list[float] = field(default_factory=list)  # one figure per round (median_ms: a CPU's median, CUDA's mean)
    attack_ms: list[float] = field(default_factory=list)

    def step(self) -> None:
        self.run.perf.activate()
        train_step(self.run, self.x, self.y)

    @property
    def arat(self) -> bool:
        """The step is AR-AT's: the cost model (26 forwards at PGD-10) and the attack timed alone are its own."""
        return self.cfg.method.name == "arat"

    def attack(self) -> None:
        self.run.perf.activate()
        attack_inputs(self.run.nets, self.x, self.y, self.cfg.attack, self.run.perf.autocast)


def build_row(name: str, cfg: TrainConfig, warmup: int) -> Row:
    run = build_run(cfg)
    x, y = next(iter(run.train_loader))
    row = Row(name, cfg, run, x, y)
    graphs = run.perf.attack_graphs  # with its attack captured, enough calls that the capture is not timed
    calls = max(warmup, 1, graphs.warmup + 1 if graphs is not None else 0)
    before, start = dynamo_counts(), time.perf_counter()
    for _ in range(calls):  # compile, autotune, allocator warm-up
        row.step()
        if row.arat:
            row.attack()
    sync(run.perf.device)
    row.warmup_s = time.perf_counter() - start
    row.warm = dynamo_counts() - before
    return row


def interleave(rows: list[Row], rounds: int, steps: int) -> None:
    """`rounds` rounds; in each, every row takes `steps` timed steps and max(1, steps // 2) timed attacks, one row
    after another, so that a machine slowing down or speeding up affects every row alike; every other round in
    reverse order, so that no row always runs first (clocks ramping, caches). Graphs compiled during a row's timed
    calls (recompiles) are counted on the row."""
    for i in range(rounds):
        for row in rows if i % 2 == 0 else rows[::-1]:
            device, before = row.run.perf.device, dynamo_counts()
            row.step_ms.append(median_ms(row.step, device, steps))
            if row.arat:  # another method (--set method.name=...) attacks its own way: its step time only
                row.attack_ms.append(median_ms(row.attack, device, max(1, steps // 2)))
            row.timed += dynamo_counts() - before


def report(row: Row) -> dict:
    step_ms = statistics.median(row.step_ms)
    attack_ms = statistics.median(row.attack_ms) if row.attack_ms else None  # AR-AT's attack only
    device, cfg, compiled = row.run.perf.device, row.cfg, row.run.perf.compiled
    before = dynamo_counts()
    profiled = profile_call(row.step, device, step_ms)
    after_warm = dynamo_counts() - before + row.timed  # the timed rounds and the profiled step
    images_per_s = len(row.y) / (step_ms / 1e3)
    epoch = derived(images_per_s, 0.0, None, epoch_images(len(row.y)))
    spread = (max(row.step_ms) - min(row.step_ms)) / step_ms if len(row.step_ms) > 1 else 0.0
    graphs = row.run.perf.attack_graphs.stats() if row.run.perf.attack_graphs is not None else None
    # a failed capture runs the attacks eagerly from then on: the row says so, under a name of its own
    eager = graphs is not None and (graphs["broken"] or graphs["eager_calls"] > 0)
    return {
        "bench": "train_step", "config": row.name + (" (capture failed: attacks ran eagerly)" if eager else ""),
        "method": cfg.method.name, "grad_sim": cfg.analysis.grad_sim, "arch": cfg.model.arch,
        "width": cfg.model.width if cfg.model.arch == "resnet18" else None,  # WRN-34-10's widths are its own
        "batch_size": len(row.y), "attack_steps": cfg.attack.num_steps, "images_per_s": round(images_per_s, 1),
        "step_ms": round(step_ms, 2), "step_spread": round(spread, 3), "rounds": len(row.step_ms),
        "attack_ms": round(attack_ms, 2) if attack_ms else None,
        "attack_share": round(attack_ms / step_ms, 3) if attack_ms else None, **cost_figures(row, images_per_s),
        "epoch_s": epoch["epoch_s"], "run100_min": epoch["run100_min"], **profiled,
        "warmup_s": round(row.warmup_s, 1),
        "graphs": row.warm["graphs"] if compiled else None,
        "recompiles_after_warmup": after_warm["graphs"] if compiled else None,
        "graph_breaks": row.warm["graph_breaks"] + after_warm["graph_breaks"] if compiled else None,
        "eager_frames": row.warm["eager_frames"] + after_warm["eager_frames"] if compiled else None,  # given up on
        "cuda_graphs": graphs, "captured": None if graphs is None else not eager,
        "perf": row.run.perf.summary(), **CEILING, "_cfg": cfg,
    }  # fmt: skip


def cost_figures(row: Row, images_per_s: float) -> dict:
    """GFLOP per image-step by METHOD 9's cost model, TFLOP/s, the fraction of the GPU's datasheet peak and the % of
    the measured matmul ceiling. The cost model is AR-AT's: another method's row, or one with analysis.grad_sim (two
    more backwards a step, which the model leaves out), gets None for each (not a wrong figure)."""
    if not row.arat or row.cfg.analysis.grad_sim:
        return dict.fromkeys(("gflop_per_image_step", "tflops", "peak_fraction", "pct_ceiling", "pct_conv_ceiling"))
    device = row.run.perf.device
    flops = forward_flops(row.run.nets.raw, row.x[:8]) * forward_units(row.cfg.attack.num_steps)
    tflops = images_per_s * flops / 1e12
    peak = peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    return {
        "gflop_per_image_step": round(flops / 1e9, 3), "tflops": round(tflops, 4),
        "peak_fraction": round(tflops / peak, 4) if peak else None,
        "pct_ceiling": derived(images_per_s, flops, CEILING.get("matmul_ceiling_tflops"))["pct_ceiling"],
        # the row's own dtype's convolutions alone (an fp32 row: fp32's, a bf16 row: bf16's): how far its step is
        # from what its convolutions alone reach
        "pct_conv_ceiling": derived(images_per_s, flops, conv_rate(row.run.perf.dtype))["pct_ceiling"],
    }  # fmt: skip


def conv_rate(dtype: torch.dtype) -> float | None:
    return (CEILING.get("conv_ceiling_tflops") or {}).get(str(dtype).removeprefix("torch."))


def release(row: Row) -> None:
    """Free a row's run: its captured attacks too (the process-wide active graphs hold their network and memory
    pool until another row activates its own), then the allocator's cache on CUDA."""
    graphs = row.run.perf.attack_graphs
    if graphs is not None:
        graphs.release()
        if active_attack_graphs() is graphs:
            set_attack_graphs(None)
    del row.run
    free_memory()


class Rows(list):
    """The rows so far, each handed to `emit` as it is added (written as it comes: a ladder stopped part-way keeps
    the rows it finished)."""

    def __init__(self, emit=None):
        super().__init__()
        self.emit = emit

    def append(self, row: dict) -> None:
        super().append(row)
        if self.emit is not None:
            self.emit(row)


def free_memory() -> None:
    """What a failed row left behind: its objects, then the allocator's cache on CUDA."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reported(built: list[Row]) -> tuple[list[dict], list[Row], list[dict]]:
    """Each row's report, or a failed row where reporting it raised: (reports, the rows reported, failed rows)."""
    reports, ok, failed = [], [], []
    for row in built:
        try:
            reports.append(report(row))
            ok.append(row)
        except Exception as error:
            failed.append(failed_row(row.name, error))
    return reports, ok, failed


def failed_row(name: str, error: Exception) -> dict:
    """A rung that raised (a compile error, out of memory, a kernel backend refusing the call): a row saying so, the
    ladder going on."""
    line = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
    return {"bench": "train_step", "config": name, "kept": False, "failed": f"{type(error).__name__}: {line}"}


def greedy(base: list[str], rounds: int, steps: int, warmup: int, device_type: str, emit=None) -> list[dict]:
    """Each switch on top of the fastest configuration so far, timed interleaved against it; kept if faster. Then
    every switch dropped before a later one was kept is tried once more on the configuration then fastest (a switch
    can lose eagerly and win compiled: on the Intel CPU the GEMM small convolutions ran 0.78x eagerly, won compiled)."""
    name, switches = LADDER[0]
    overrides, chain = base + switches, 1.0
    best = build_row(name, apply_overrides(get_recipe("demo"), overrides), warmup)
    rows, base_done = Rows(emit), False
    base_figures = {"kept": True, "vs_previous": 1.0, "vs_fp32_eager": 1.0}

    def attempt(name: str, switches: list[str]) -> bool:
        nonlocal overrides, chain, best, base_done
        candidate = base_row = failure = None
        try:
            candidate = build_row(name, apply_overrides(get_recipe("demo"), overrides + switches), warmup)
            best.step_ms.clear(), best.attack_ms.clear(), best.timed.clear()
            interleave([best, candidate], rounds, steps)
            if not base_done:  # the base row, from its first timing against a candidate
                base_row = report(best) | base_figures
            ratio = statistics.median(b / c for b, c in zip(best.step_ms, candidate.step_ms, strict=True))  # per round
            row = report(candidate)
        except Exception as error:  # this rung's failure, not the ladder's: said, dropped, the next one tried
            failure = failed_row(name, error)
        if base_row is not None:
            rows.append(base_row)
            base_done = True
        if failure is not None:
            rows.append(failure)
            print(f"{name}: failed ({failure['failed']}), dropped", flush=True)
            if candidate is not None:
                release(candidate)
            free_memory()
            return False
        # never kept: an eager attack under the captured name, or compiled code dynamo gave up on (at its recompile
        # limit, or on an error) and ran eagerly under the compiled name
        kept = ratio > 1.0 and row.get("captured") is not False and not row.get("eager_frames")
        figures = {"kept": kept, "vs_previous": round(ratio, 3), "vs_fp32_eager": round(chain * ratio, 3)}
        row |= figures
        rows.append(row)
        print(f"{name}: {row['step_ms']} ms vs {statistics.median(best.step_ms):.1f} ms -> {ratio:.2f}x, "
              f"{'kept' if kept else 'dropped'}", flush=True)  # fmt: skip
        if kept:
            chain *= ratio
            overrides += switches
            release(best)
            best = candidate
        else:
            release(candidate)
        return kept

    rungs = [(name, switches) for name, switches in LADDER[1:] if applies(name, device_type)]
    kept = [attempt(name, switches) for name, switches in rungs]
    last_kept = max((i for i, k in enumerate(kept) if k), default=0)  # none kept: nothing changed, no retry
    for i, (name, switches) in enumerate(rungs[:last_kept]):
        if not kept[i]:
            attempt(f"{name} (again)", switches)
    if not base_done:  # no rung timed against it (each failed): the base row alone, before them in the table
        best.step_ms.clear(), best.attack_ms.clear(), best.timed.clear()
        interleave([best], rounds, steps)
        rows.insert(0, report(best) | base_figures)
        if emit is not None:
            emit(rows[0])
    rows.append(direct_check(best, base + LADDER[0][1], rounds, steps, warmup))
    return rows


def direct_check(best: Row, fp32_overrides: list[str], rounds: int, steps: int, warmup: int) -> dict:
    """The fastest configuration timed again, interleaved directly against a fresh fp32 eager row: one ratio (median
    of per-round ratios) instead of the product of the ladder's, whose noise compounds."""
    reference = build_row("fp32 eager", apply_overrides(get_recipe("demo"), fp32_overrides), warmup)
    best.step_ms.clear(), best.attack_ms.clear(), best.timed.clear()
    interleave([reference, best], rounds, steps)
    ratio = statistics.median(r / b for r, b in zip(reference.step_ms, best.step_ms, strict=True))
    print(f"direct: {best.name} {statistics.median(best.step_ms):.1f} ms vs fp32 eager "
          f"{statistics.median(reference.step_ms):.1f} ms -> {ratio:.2f}x", flush=True)  # fmt: skip
    reference_ms = round(statistics.median(reference.step_ms), 2)
    release(reference)
    reported = report(best)  # (its name says a failed capture)
    direct = {"config": f"{reported['config']} (direct vs fp32 eager)", "kept": True, "vs_fp32_eager": round(ratio, 3)}
    return reported | direct | {"fp32_eager_step_ms": reference_ms}


def cumulative(base: list[str], wanted: set[int], rounds: int, steps: int, warmup: int, device_type: str) -> list[dict]:
    overrides, built, failed = list(base), [], []
    for i, (name, switches) in enumerate(LADDER):
        if not applies(name, device_type):
            continue
        overrides += switches
        if i in wanted:
            try:
                built.append(build_row(name, apply_overrides(get_recipe("demo"), overrides), warmup))
            except Exception as error:
                failed.append(failed_row(name, error))
                print(f"{name}: failed ({failed[-1]['failed']})", flush=True)
                free_memory()
    interleave(built, rounds, steps)
    rows, built, unreported = reported(built)
    failed += unreported
    reference = built[0] if built and built[0].name == LADDER[0][0] else None  # fp32 eager, when it ran
    for row, b in zip(rows, built, strict=True):  # the median of per-round ratios, as the other modes give
        ratios = [r / mine for r, mine in zip(reference.step_ms, b.step_ms, strict=True)] if reference else None
        row["vs_fp32_eager"] = round(statistics.median(ratios), 3) if ratios else None
    return rows + failed


def compare(base: list[str], key: str, values: list[str], rounds: int, steps: int, warmup: int) -> list[dict]:
    """One switch's values on the same base, interleaved; `vs_first` is the median of per-round ratios."""
    configs = [apply_overrides(get_recipe("demo"), base + [f"{key}={v}"]) for v in values]
    if any(c.analysis.grad_sim for c in configs):  # before any row compiles: building a grad-sim row later would
        keep_saved_tensors()  # drop the rows' graphs built so far (they would recompile in their timed rounds)
        print("note: a grad-sim row is compared: every row compiles without donated buffers and Inductor's caches",
              flush=True)  # fmt: skip
    built, failed = [], []
    for v, cfg in zip(values, configs, strict=True):
        try:
            built.append(build_row(f"{key}={v}", cfg, warmup))
        except Exception as error:
            failed.append(failed_row(f"{key}={v}", error))
            print(f"{key}={v}: failed ({failed[-1]['failed']})", flush=True)
            free_memory()
    interleave(built, rounds, steps)
    rows, built, unreported = reported(built)
    first = built[0] if built and built[0].name == f"{key}={values[0]}" else None  # vs_first: the first value's
    for row, b in zip(rows, built, strict=True):
        ratios = [one / mine for one, mine in zip(first.step_ms, b.step_ms, strict=True)] if first else None
        row["vs_first"] = round(statistics.median(ratios), 3) if ratios else None
    return rows + failed + unreported


def short_run_accuracy(cfg, epochs: int, out_dir: str) -> dict:
    from engine.train import run_training

    cfg = apply_overrides(cfg, [f"train.epochs={epochs}", "eval.attacks=clean,pgd20"])
    import json
    from pathlib import Path

    run = run_training(cfg, out_dir)
    results = json.loads((Path(run) / "results.json").read_text())["results"]
    return {"clean": results["clean"]["accuracy"], "pgd20": results["pgd20"]["accuracy"]}


SIZES = {"width": 64, "batch_size": 128, "attack_steps": 10, "rounds": 5}
QUICK_SIZES = {"width": 16, "batch_size": 64, "attack_steps": 5, "rounds": 3}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet18", choices=["resnet18", "wrn34-10"])
    p.add_argument("--width", type=positive_int, help="ResNet-18's width (default 64; --quick: 16)")
    p.add_argument("--batch-size", type=positive_int, help="default 128; --quick: 64")
    p.add_argument("--attack-steps", type=positive_int, help="PGD steps (default 10; --quick: 5)")
    p.add_argument("--steps", type=positive_int, default=3, help="timed steps per row and round (a CPU: their "
                   "median; CUDA: their mean, timed back to back)")  # fmt: skip
    p.add_argument("--rounds", type=positive_int, help="interleaved rounds; a row's figure: the median (5; --quick: 3)")
    p.add_argument("--warmup", type=positive_int, default=2)
    mode = p.add_mutually_exclusive_group()  # default: the greedy ladder
    mode.add_argument("--cumulative", action="store_true", help="every switch on the previous row (not greedy)")
    mode.add_argument("--direct", metavar="KEY=V,KEY=V", help="one configuration (on fp32 eager's switches) timed "
                      "interleaved against fp32 eager, e.g. perf.dtype=bf16,perf.compile=on")  # fmt: skip
    mode.add_argument("--compare", metavar="KEY=A,B", help="one switch's values, interleaved (perf.kernels=off,on)")
    p.add_argument("--rows", default=None, help="--cumulative: indices into the ladder (default: all)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every row (e.g. perf.dtype=fp32 with --compare), repeatable; the "
                        "ladder's own switches only with --compare")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="ResNet-18 width 16, batch 64, PGD-5, 3 rounds, no compile")
    p.add_argument("--train-epochs", type=int, default=0, help="also train each row briefly and report accuracy")
    p.add_argument("--data-dir", default=None, help="real CIFAR-10 for --train-epochs (default: synthetic)")
    p.add_argument("--out", default="bench/results/train_step.jsonl")
    args = p.parse_args(argv)
    for key, value in (QUICK_SIZES if args.quick else SIZES).items():  # what the user gave stays
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.rows is not None:
        if not args.cumulative:
            p.error("--rows picks rows of --cumulative: add --cumulative")
        ladder = [name for name, _ in LADDER if not (args.quick and name == "+torch.compile")]
        try:
            args.rows = sorted({int(i) for i in args.rows.split(",")})
        except ValueError:
            p.error(f"--rows {args.rows}: give ladder indices, e.g. 0,3,4")
        if args.rows[0] < 0 or args.rows[-1] >= len(ladder):
            p.error(f"--rows: the ladder's rows are 0-{len(ladder) - 1} ({', '.join(ladder)})")
    clash = next((o for o in args.overrides if o.partition("=")[0].strip() in LADDER_KEYS), None)
    if clash and not args.compare:  # the ladder (or --direct's fp32 reference) would set it over the user's value
        key = clash.partition("=")[0].strip()
        p.error(f"--set {clash}: the ladder sets {key} itself; time it with --compare {key}=A,B or in --direct")
    return args


def base_overrides(args: argparse.Namespace) -> list[str]:
    """Every row's configuration before the ladder's switches: the network, the step, the data, then --set."""
    base = [
        f"model.arch={args.arch}",
        *([f"model.width={args.width}"] if args.arch == "resnet18" else []),  # WRN-34-10's widths are its own
        f"train.batch_size={args.batch_size}",
        f"attack.num_steps={args.attack_steps}",
        "attack.step_size=2/255",
        "data.dataset=synthetic",
        f"data.synthetic_size={args.batch_size}",
    ]
    if args.data_dir:
        base[-2:] = [
            "data.dataset=cifar10",
            f"data.data_dir={args.data_dir}",
            "data.train_subset=10000",
            "data.synthetic_fallback=false",
        ]  # no CIFAR-10 there: an error, not synthetic figures
    return base + args.overrides


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # a frame at dynamo's recompile limit runs eagerly for the rest of the process without counting again
    # (helper-114): a later row would time eager code under a compiled name. Raised instead: that row fails (for
    # this benchmark only: a caller's later compiles keep dynamo's own behaviour)
    with torch._dynamo.config.patch(fail_on_cache_limit_hit=True):  # (fail_on_recompile_limit_hit from torch 2.7)
        return benchmark(args)


def benchmark(args) -> int:
    global LADDER
    base = base_overrides(args)
    # the rows run where the configuration says (--set perf.device=cpu on a GPU machine: the CPU ladder); a bad
    # setting is a UserError, one line and exit 2 through run_cli
    first = apply_overrides(get_recipe("demo"), base)
    device = resolve_device(first.perf.device)
    if args.quick:  # compiling takes minutes on a small CPU
        LADDER = [rung for rung in LADDER if rung[0] != "+torch.compile"]
    CEILING.clear()  # measured afresh on this device (a second call in one process: another device's figures)
    CEILING.update(matmul_ceiling(device))
    CEILING.update(conv_ceiling(first, device))
    order = "direct" if args.direct else "compare" if args.compare else "cumulative" if args.cumulative else "greedy"
    stamp, written = provenance(device), []

    def write(row: dict) -> None:  # stamped, trained briefly if asked, appended to --out at once
        row = row | {"ladder": order} | stamp
        cfg = row.pop("_cfg", None)
        if args.train_epochs and cfg is not None:
            at = f"bench/results/runs/train_step-{len(written)}-{time.time():.0f}-{os.getpid()}"  # two benches at once
            row |= short_run_accuracy(cfg, args.train_epochs, at)
        append_jsonl(args.out, [row])
        written.append(row)

    if args.direct:
        fp32 = base + LADDER[0][1]
        cfg = apply_overrides(get_recipe("demo"), fp32 + args.direct.split(","))  # a bad key: one line, exit 2
        try:
            rows = [direct_check(build_row(args.direct, cfg, args.warmup), fp32, args.rounds, args.steps, args.warmup)]
        except UserError:
            raise
        except Exception as error:  # a row saying so, written like the ladder's (exit 1 below)
            rows = [failed_row(f"{args.direct} (direct vs fp32 eager)", error)]
    elif args.compare:
        key, _, values = args.compare.partition("=")
        rows = compare(base, key, values.split(","), args.rounds, args.steps, args.warmup)
    elif args.cumulative:
        wanted = set(args.rows) if args.rows else set(range(len(LADDER)))
        skipped = [f"{i} ({LADDER[i][0]})" for i in sorted(wanted) if not applies(LADDER[i][0], device.type)]
        if skipped and args.rows:  # asked for by index: say why they are missing (the whole ladder skips silently)
            print(f"rows {', '.join(skipped)}: not on a {device.type} device, skipped", flush=True)
            if len(skipped) == len(wanted):
                raise UserError(f"--rows: none of the rows asked for runs on a {device.type} device")
        rows = cumulative(base, wanted, args.rounds, args.steps, args.warmup, device.type)
    else:
        # each row written as it comes; with --train-epochs after the ladder (its runs would share the device with
        # the rows still held, and a failed one would read as a rung's failure)
        rows = greedy(base, args.rounds, args.steps, args.warmup, device.type, None if args.train_epochs else write)
    if order != "greedy" or args.train_epochs:
        for row in rows:
            write(row)
    print_table(written, stamp, order, device.type, args.train_epochs > 0)
    return 1 if written and all(row.get("failed") for row in written) else 0  # (nothing measured)


def print_table(rows: list[dict], stamp: dict, order: str, device_type: str, accuracy: bool) -> None:
    columns = ["config", "kept", "images_per_s", "step_ms", "step_spread", "vs_fp32_eager", "vs_first", "attack_ms",
               "attack_share", "ops_per_step", "graphs", "recompiles_after_warmup", "graph_breaks", "eager_frames",
               "tflops", "pct_ceiling", "pct_conv_ceiling", "epoch_s", "run100_min", "warmup_s"]  # fmt: skip
    if device_type == "cuda":
        at = columns.index("ops_per_step") + 1
        columns[at:at] = ["kernels_per_step", "launches_per_step", "busy_fraction"]
        columns.insert(columns.index("pct_ceiling"), "peak_fraction")
    print(
        f"{stamp['cpu']} (native bf16: {stamp['cpu_native_bf16']}, {stamp['cpu_threads']} threads), {order} ladder; "
        f"matrix-product ceiling {CEILING['matmul_ceiling_case']}: {CEILING['matmul_ceiling_tflops']} TFLOP/s"
    )
    failed = ["failed"] if any(row.get("failed") for row in rows) else []
    print(markdown_table(rows, columns + (["clean", "pgd20"] if accuracy else []) + failed))
    if CEILING.get("conv_ceiling_tflops"):
        print(ladder_bound(rows))


def ladder_bound(rows: list[dict]) -> str:
    """The convolution ceilings, and what the fastest of them bounds the ladder to: its TFLOP/s over the fp32 eager
    row's (the cost model's FLOPs; the ceiling leaves out batch norm, activations and Python, so the bound is
    generous, but it times no weight gradient: those convolutions may run a little faster or slower, hence "about")."""
    conv = CEILING.get("conv_ceiling_tflops") or {}
    line = f"convolutions alone ({CEILING.get('conv_ceiling_case')}, channels-last): " + ", ".join(
        f"{dtype} {tflops} TFLOP/s" for dtype, tflops in conv.items()
    )
    reference = fp32_eager_tflops(rows)
    if reference is None:
        return line
    best = max(conv, key=conv.get)
    return (
        f"{line}; a step at the {best} rate would be {conv[best] / reference:.2f}x the fp32 eager row "
        f"({reference:.3g} TFLOP/s): about the most the ladder can gain on this device without computing less"
    )


def fp32_eager_tflops(rows: list[dict]) -> float | None:
    """fp32 eager's TFLOP/s: from a direct row (its fp32 eager step timed interleaved with it; the same FLOPs per
    step), else from the ladder's fp32 eager row; None without either (or without the cost model: another method)."""
    for row in rows:
        if row.get("fp32_eager_step_ms") and row.get("tflops") and row.get("step_ms"):
            return row["tflops"] * row["step_ms"] / row["fp32_eager_step_ms"]
    return next((row["tflops"] for row in rows if row.get("config") == "fp32 eager" and row.get("tflops")), None)


if __name__ == "__main__":
    run_cli(main, "bench/train_step.py")
