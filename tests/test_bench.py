"""The benchmark suite's figures: the cost model (METHOD 9) by hand, the GPU-busy interval union, and one tiny run of
bench/train_step.py end to end (its rows carry the projected epoch times and the % of the matmul ceiling)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from cost_model import EPOCH_IMAGES, derived, epoch_images, forward_units  # noqa: E402


def test_cost_model_figures_by_hand():
    assert forward_units(10) == 26 and forward_units(0) == 6
    assert epoch_images(128) == EPOCH_IMAGES == 49_920 and epoch_images(32) == 49_984 and epoch_images(1) == 50_000
    # 100 img/s at 1 GFLOP per image and step: 0.1 TFLOP/s, 20% of a 0.5 TFLOP/s ceiling, 499.2 s per epoch
    got = derived(100.0, 1e9, 0.5)
    assert got == {"images_per_s": 100.0, "tflops": 0.1, "pct_989": 0.01, "pct_ceiling": 20.0, "epoch_s": 499.2,
                   "run100_min": 832.0}  # fmt: skip
    assert derived(100.0, 1e9, None, images_per_epoch=epoch_images(32))["epoch_s"] == 499.84
    assert derived(0.0, 1e9, None)["epoch_s"] is None and derived(100.0, 1e9, None)["pct_ceiling"] is None


def test_busy_time_is_the_union_of_the_kernels_intervals():
    from train_step import busy_us

    assert busy_us([]) == 0
    assert busy_us([(20, 30), (0, 10), (5, 15), (21, 22)]) == 25  # overlaps count once, nested ones not at all
    assert busy_us([(0, 10), (10, 20)]) == 20


def test_kernel_figures_count_device_events_only():
    """The CUDA branch of a row's profile, on stand-in events: CPU ops and the GPU copies of record_function ranges
    are not kernels, nor are memory copies and sets, though the GPU is busy with them; the busy fraction is the
    device events' union over the wall time given (the unprofiled step's, where the caller has it)."""
    from types import SimpleNamespace

    import torch
    from train_step import kernel_figures

    cpu, gpu = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA

    def event(device, start, end, annotation=False, name="kernel"):
        return SimpleNamespace(device_type=device, time_range=SimpleNamespace(start=start, end=end),
                               is_user_annotation=annotation, name=name)  # fmt: skip

    events = [event(cpu, 0, 100), event(gpu, 10, 30), event(gpu, 20, 40), event(gpu, 0, 100, annotation=True),
              event(gpu, 60, 70), event(gpu, 80, 90, name="Memcpy HtoD (Pageable -> Device)"),
              event(cpu, 1, 2, name="cudaLaunchKernel"), event(cpu, 3, 4, name="cuLaunchKernel"),
              event(cpu, 5, 6, name="cudaGraphLaunch")]  # fmt: skip
    # the graph's replay executed a kernel the host did not launch one by one: 3 executed, 2 launches + 1 graph
    launches = {"launches_per_step": 2, "graph_launches_per_step": 1.0}
    assert kernel_figures(events, wall_us=100.0) == {"kernels_per_step": 3, "busy_fraction": 0.5} | launches
    halved = {"launches_per_step": 1, "graph_launches_per_step": 0.5}
    assert kernel_figures(events, wall_us=200.0, steps=2) == {"kernels_per_step": 2, "busy_fraction": 0.25} | halved
    assert kernel_figures(events, wall_us=500.0, steps=2, step_ms=0.1)["busy_fraction"] == 0.25  # the unprofiled time
    nothing = {"kernels_per_step": 0, "launches_per_step": 0, "graph_launches_per_step": 0.0, "busy_fraction": 0.0}
    assert kernel_figures([], wall_us=100.0) == nothing


def test_a_benchmark_that_alternates_runs_switches_cudnn_autotuning_with_them():
    """cudnn.benchmark is process-wide and set when a run is built: a row timed after another row was built must
    run with its own setting (Perf.activate, called before each timed step and attack)."""
    import torch

    from engine.perf import Perf

    def perf(benchmark):
        return Perf(torch.device("cuda"), torch.float32, True, False, "off", cudnn_benchmark=benchmark)

    on, off, saved = perf(True), perf(False), torch.backends.cudnn.benchmark
    try:
        for row in (on, off, on):
            row.activate()
            assert torch.backends.cudnn.benchmark is row.cudnn_benchmark
    finally:
        torch.backends.cudnn.benchmark = saved


@pytest.mark.slow
def test_a_tiny_ladder_row_carries_the_derived_figures(tmp_path):
    out = tmp_path / "rows.jsonl"
    cmd = [sys.executable, str(REPO / "bench" / "train_step.py"), "--width", "8", "--batch-size", "8",
           "--attack-steps", "1", "--rounds", "1", "--steps", "1", "--warmup", "1", "--direct",
           "perf.channels_last=true", "--out", str(out)]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "matrix-product ceiling" in done.stdout
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["config"] == "perf.channels_last=true (direct vs fp32 eager)" and row["batch_size"] == 8
    assert row["method"] == "arat" and row["attack_ms"] > 0
    assert row["matmul_ceiling_tflops"] > 0 and row["matmul_ceiling_case"].endswith(" 2048^3")
    assert row["pct_ceiling"] == pytest.approx(100 * row["tflops"] / row["matmul_ceiling_tflops"], rel=0.02, abs=0.01)
    assert row["epoch_s"] == pytest.approx(epoch_images(8) / row["images_per_s"], rel=1e-3)
    assert row["run100_min"] == pytest.approx(100 * row["epoch_s"] / 60, rel=1e-3)
    assert row["ops_per_step"] > 0 and row["kernels_per_step"] is None and row["busy_fraction"] is None  # CPU
    assert row["cpu"] and row["cpu_native_bf16"] in (True, False)
    assert row["gflop_per_image_step"] == pytest.approx(forward_units(1) * resnet18_flops(8) / 1e9, abs=1e-3)
    # the network's own convolutions alone, per dtype; the row's % of its dtype's (fp32 here) and the ladder's bound
    conv = row["conv_ceiling_tflops"]
    assert conv["float32"] > 0 and list(conv) == ["float32"] + (["bfloat16"] if row["cpu_native_bf16"] else [])
    assert row["conv_ceiling_case"] == "20 convolutions, batch 8, forward + input gradient"
    assert row["pct_conv_ceiling"] == pytest.approx(100 * row["tflops"] / conv["float32"], rel=0.02, abs=0.01)
    assert "convolutions alone (20 convolutions, batch 8" in done.stdout and "x the fp32 eager row" in done.stdout


def test_another_methods_rows_time_its_step_without_ar_at_s_cost_model(tmp_path):
    """`--set method.name=trades` (docs/methods.md times TRADES's BN order so): the rows time TRADES's step and say
    so; the figures of METHOD 9's AR-AT cost model (TFLOP/s, % of the ceiling) and AR-AT's attack alone are absent,
    not AR-AT's figures under TRADES's name."""
    out = tmp_path / "rows.jsonl"
    cmd = [sys.executable, str(REPO / "bench" / "train_step.py"), "--width", "8", "--batch-size", "8",
           "--attack-steps", "1", "--rounds", "1", "--steps", "1", "--warmup", "1", "--set", "method.name=trades",
           "--set", "model.split_bn=false", "--compare", "method.published_bn_updates=false,true",
           "--out", str(out)]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["config"] for r in rows] == [f"method.published_bn_updates={v}" for v in ("false", "true")]
    for row in rows:
        assert row["method"] == "trades" and row["step_ms"] > 0 and row["images_per_s"] > 0 and row["epoch_s"] > 0
        assert row["tflops"] is row["pct_ceiling"] is row["gflop_per_image_step"] is row["attack_ms"] is None


def resnet18_flops(width: int, classes: int = 10) -> int:
    """The CIFAR ResNet-18's forward FLOPs per image, by hand: 2 x multiply-adds of every convolution and the
    classifier (batch norms and ReLUs are not counted by the cost model)."""

    def conv(c_in, c_out, k, side):
        return 2 * c_in * c_out * k * k * side * side

    total, c, side = conv(3, width, 3, 32), width, 32
    for stage, mult in enumerate((1, 2, 4, 8)):
        out = width * mult
        if stage:
            side //= 2
            total += conv(c, out, 1, side)  # the shortcut's projection
        total += conv(c, out, 3, side) + 3 * conv(out, out, 3, side)
        c = out
    return total + 2 * c * classes


def test_the_convolution_ceiling_times_every_convolution_of_the_network(monkeypatch):
    """The convolutions the ceiling times are the network's own, each as often as a forward runs it: their forward
    FLOPs add up to the hand count less the classifier; WRN-34-10's 34 too."""
    import torch
    from train_step import conv_flops, network_convs

    from engine.config import ModelConfig
    from engine.models import build_model

    model = build_model(ModelConfig(arch="resnet18", width=8), 10).train()
    convs = network_convs(model, 2, torch.device("cpu"))
    assert sum(convs.values()) == 20 and model.training  # left in the mode it was in
    total = 0
    for (shape, weight_shape, *args), count in convs.items():
        out = torch.nn.functional.conv2d(torch.zeros(shape), torch.zeros(weight_shape), None, *args)
        total += count * conv_flops(out.shape, weight_shape)
    assert total == 2 * (resnet18_flops(8) - 2 * 64 * 10)
    assert sum(network_convs(build_model(ModelConfig(arch="wrn34-10"), 10), 1, torch.device("cpu")).values()) == 34
    # measured with cuDNN's autotuning on (a ceiling), the process's own setting back after (the rows set theirs)
    from train_step import conv_ceiling

    from engine.config import apply_overrides
    from engine.recipes import get_recipe

    cfg = apply_overrides(get_recipe("demo"), ["model.width=8", "train.batch_size=2", "data.dataset=synthetic"])
    seen = []
    monkeypatch.setattr("train_step.median_ms", lambda fn, device, reps: seen.append(torch.backends.cudnn.benchmark)
                        or 1.0)  # fmt: skip
    torch.backends.cudnn.benchmark = False
    figures = conv_ceiling(cfg, torch.device("cpu"))
    assert set(seen) == {True} and torch.backends.cudnn.benchmark is False
    assert figures["conv_ceiling_case"] == "20 convolutions, batch 2, forward + input gradient"


def test_a_captured_convolution_keeps_the_inputs_its_graph_reads(monkeypatch):
    """A CUDA graph keeps only the addresses of what it reads: the replay returned for a captured pass must hold
    the pass (whose defaults hold its inputs), or the inputs are freed and the next capture's memory replayed
    (helper-124). torch.cuda's graph, streams and capture stood in for (no GPU here): the inputs outlive the
    function that made them, and the replay runs the graph."""
    import contextlib
    import gc
    import weakref

    import torch
    from train_step import captured

    replays = []

    class Graph:
        def replay(self):
            replays.append(1)

    class Stream:
        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph", lambda graph: contextlib.nullcontext())

    def make():
        x = torch.ones(4)

        def passes(x=x):
            x.mul(2)

        return captured(passes), weakref.ref(x)

    replay, alive = make()
    gc.collect()
    assert alive() is not None
    replay()
    assert replays == [1]


def test_the_ladder_bound_is_the_fastest_convolution_rate_over_fp32_eager_s(monkeypatch):
    """The summary line: the fastest dtype's convolution TFLOP/s over the fp32 eager row's, taken from the direct
    row's own fp32 eager step when there is one (the same FLOPs per step), else from the ladder's first row."""
    import train_step as ts

    conv = {"conv_ceiling_tflops": {"float32": 0.2, "bfloat16": 0.4}, "conv_ceiling_case": "20 convolutions"}
    monkeypatch.setattr(ts, "CEILING", conv)
    ladder = [{"config": "fp32 eager", "tflops": 0.1, "step_ms": 500.0}, {"config": "+bf16", "tflops": 0.2}]
    assert ts.ladder_bound(ladder).endswith(
        "bfloat16 0.4 TFLOP/s; a step at the bfloat16 rate would be 4.00x the fp32 eager row (0.1 TFLOP/s): about the "
        "most the ladder can gain on this device without computing less"
    )
    direct = {"config": "+bf16 (direct vs fp32 eager)", "tflops": 0.2, "step_ms": 250.0, "fp32_eager_step_ms": 625.0}
    assert "would be 5.00x the fp32 eager row (0.08 TFLOP/s)" in ts.ladder_bound([*ladder, direct])
    other = ts.ladder_bound([{"config": "fp32 eager", "tflops": None}])  # another method: no cost model, no bound
    assert other == "convolutions alone (20 convolutions, channels-last): float32 0.2 TFLOP/s, bfloat16 0.4 TFLOP/s"


def test_the_cost_model_counts_what_method_9_says():
    """F counted by FlopCounterMode on the adv branch equals the hand count, and a PGD-10 image-step is 26F =
    28.9 GFLOP for ResNet-18 (METHOD 9)."""
    import torch
    from train_step import forward_flops

    from engine.config import ModelConfig
    from engine.models import build_model

    for width in (8, 64):
        model = build_model(ModelConfig(arch="resnet18", width=width), 10)
        assert forward_flops(model, torch.rand(2, 3, 32, 32)) == resnet18_flops(width)
    assert forward_units(10) == 26 and round(26 * resnet18_flops(64) / 1e9, 1) == 28.9


def test_protocol_pairs_count_image_by_image():
    import torch
    from aa_protocols import paired

    from engine.evaluate import pack

    standard = torch.tensor([1, 1, 0, 0, 0, 1, 0, 0, 0, 1], dtype=torch.bool)
    legacy = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 0, 1], dtype=torch.bool)
    got = paired({"num_examples": 10, "flags": pack(standard)}, {"num_examples": 10, "flags": pack(legacy)})
    assert got == {"robust_both": 3, "legacy_only": 2, "standard_only": 1, "over_read_points": 10.0}


@pytest.mark.slow
def test_eval_ranks_reads_a_legacy_10_record_by_attack_name(tmp_path):
    """`--aa-version legacy-10`: the record keys its AutoAttack "aa-legacy-10" (each protocol apart in a run's
    files), and the rows, built after every evaluation of every rank count, looked it up as "aa" (a KeyError)."""
    from eval_ranks import record_results

    from engine.evaluate import summary
    from engine.rundir import atomic_json

    (tmp_path / "records").mkdir()
    figures = {"aa": {"accuracy": 0.5, "num_examples": 8, "version": "legacy-10", "seconds": 1.0, "flags": "00"},
               "clean": {"accuracy": 0.75, "num_examples": 8, "seconds": 0.1, "flags": "00"}}  # fmt: skip
    atomic_json(tmp_path / "records" / "20261206-000000.json", {"results": summary(figures)})  # as `arat eval` writes
    assert record_results(tmp_path) == {k: {f: v for f, v in r.items() if f != "flags"} for k, r in figures.items()}


def test_eval_ranks_rows_say_the_flags_of_two_ranks_equal_one(tmp_path):
    """bench/eval_ranks.py end to end on a tiny network: `arat eval` under torchrun with 1 and 2 ranks, a row each
    with its speed-up, efficiency and balance, and the per-image flags compared across rank counts."""
    import torch

    from engine.models import build_model
    from engine.recipes import get_recipe

    cfg = get_recipe("smoke")
    torch.manual_seed(0)
    ckpt = tmp_path / "tiny.pt"
    torch.save({"model": build_model(cfg.model, cfg.data.num_classes).state_dict(), "config": cfg.to_dict()}, ckpt)
    out = tmp_path / "rows.jsonl"
    cmd = [sys.executable, str(REPO / "bench" / "eval_ranks.py"), "--target", str(ckpt), "--attacks", "clean,pgd20",
           "--num-examples", "32", "--chunk-size", "8", "--batch-size", "8", "--ranks", "1,2", "--threads", "2",
           "--threads-per-rank", "1", "--device", "cpu", "--out", str(out)]  # fmt: skip
    # one thread per rank in both rows: a thread count may change a float's last bits, and so a flag
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads(line) for line in out.read_text().splitlines())
    assert (one["ranks"], one["threads_per_rank"], two["ranks"], two["threads_per_rank"]) == (1, 1, 2, 1)
    assert two["flags_identical"]  # against the 1-rank run's flags
    assert one["chunks"] == two["chunks"] == {"clean": 4, "pgd20": 4}
    # flags of both kinds to mix up, for each attack (PGD-20's all False would compare equal in any order)
    assert one["accuracy"] == two["accuracy"] and all(0 < a < 1 for a in one["accuracy"].values())
    assert one["speed_up"] == 1.0 and two["speed_up"] == round(one["eval_seconds"] / two["eval_seconds"], 3)
    assert two["efficiency"] == round(two["speed_up"] / 2, 3)
    assert 0 < two["balance"] <= 1.5 and two["cpu"]
    assert (two["compile"], two["batch_size"], two["seed"], two["rounds"]) == ("off", 8, 0, 1)  # what timed it
    assert "| ranks |" in proc.stdout


def test_launch_overhead_times_the_triton_route_with_its_launches_stubbed(tmp_path):
    """bench/launch_overhead.py end to end (compiled Triton imported, launches stubbed): six rows, stamped."""
    pytest.importorskip("triton")
    out = tmp_path / "overhead.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(REPO / "bench" / "launch_overhead.py"), "--reps", "20", "--out",
                             str(out)], env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    ops = ("dual_bn fwd", "dual_bn fwd+bwd", "pgd_step")
    assert [(r["op"], r["route"]) for r in rows] == [(op, route) for op in ops for route in ("triton_op", "aten")]
    assert all(r["us_per_call"] > 0 and r["cpu"] for r in rows)
    refused = subprocess.run([sys.executable, str(REPO / "bench" / "launch_overhead.py")], env=env | {
        "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert refused.returncode == 2 and "without TRITON_INTERPRET=1" in refused.stdout


STAND_IN_LADDER = [
    ("fp32 eager", ["perf.dtype=fp32", "perf.compile=off", "perf.gemm_conv=0", "perf.dual_forward=false"]),
    ("+bf16 autocast", ["perf.dtype=bf16"]),
    ("+GEMM small convs", ["perf.gemm_conv=8"]),
    ("+torch.compile", ["perf.compile=on"]),
    ("+dual forward", ["perf.dual_forward=true"]),
]


def stand_in_ladder(monkeypatch, step_ms) -> tuple:
    """bench/train_step.py with a stand-in timing model (`step_ms` of a row's overrides; no network runs) and a
    recording direct check; returns the module and the direct check's calls."""
    import types
    from collections import Counter

    import train_step as ts

    def build_row(name, cfg, warmup):
        return types.SimpleNamespace(name=name, overrides=cfg, step_ms=[], attack_ms=[], timed=Counter())

    def interleave(rows, rounds, steps):
        for row in rows:
            row.step_ms += [step_ms(row.overrides)] * rounds

    direct_calls = []

    def direct_check(best, fp32_overrides, *rest):
        direct_calls.append(fp32_overrides)
        return {"config": f"{best.name} (direct)", "best": best}

    monkeypatch.setattr(ts, "LADDER", STAND_IN_LADDER)
    monkeypatch.setattr(ts, "apply_overrides", lambda cfg, overrides: list(overrides))
    monkeypatch.setattr(ts, "get_recipe", lambda name: None)
    monkeypatch.setattr(ts, "build_row", build_row)
    monkeypatch.setattr(ts, "interleave", interleave)
    monkeypatch.setattr(ts, "report", lambda row: {"config": row.name, "step_ms": row.step_ms[0]})
    monkeypatch.setattr(ts, "release", lambda row: None)
    monkeypatch.setattr(ts, "direct_check", direct_check)
    return ts, direct_calls


def test_the_greedy_ladder_retries_a_switch_dropped_before_a_later_one_was_kept(monkeypatch):
    """The GEMM convolutions slow the eager step and speed up the compiled one. The first pass drops them, keeps
    compile; the retry on the compiled configuration keeps them. A switch dropped after the last kept one is not
    retried (it was already timed against the final configuration). The direct check's reference is fp32 eager."""

    def step_ms(overrides: list[str]) -> float:
        on = {o for o in overrides if o.endswith(("=on", "=true", "=bf16", "=8"))}
        compiled = "perf.compile=on" in on
        ms = 100.0 * (0.5 if "perf.dtype=bf16" in on else 1.0) * (0.8 if compiled else 1.0)
        if "perf.gemm_conv=8" in on:
            ms *= 0.9 if compiled else 1.3
        return ms * (1.1 if "perf.dual_forward=true" in on else 1.0)

    ts, direct_calls = stand_in_ladder(monkeypatch, step_ms)
    rows = ts.greedy(["model.width=8"], rounds=3, steps=1, warmup=1, device_type="cpu")
    assert [(r["config"], r.get("kept")) for r in rows] == [
        ("fp32 eager", True), ("+bf16 autocast", True), ("+GEMM small convs", False), ("+torch.compile", True),
        ("+dual forward", False), ("+GEMM small convs (again)", True), ("+GEMM small convs (again) (direct)", None),
    ]  # fmt: skip
    assert rows[2]["vs_previous"] == pytest.approx(1 / 1.3, rel=1e-3)
    assert rows[5]["vs_previous"] == pytest.approx(1 / 0.9, rel=1e-3)
    assert rows[5]["vs_fp32_eager"] == pytest.approx(1 / (0.5 * 0.8 * 0.9), rel=1e-3)
    best = rows[-1]["best"].overrides
    assert {"perf.dtype=bf16", "perf.compile=on", "perf.gemm_conv=8"} <= set(best) and best[-1] == "perf.gemm_conv=8"
    assert "perf.dual_forward=true" not in best
    assert direct_calls == [["model.width=8"] + STAND_IN_LADDER[0][1]]


def test_a_greedy_ladder_that_keeps_nothing_retries_nothing(monkeypatch):
    """Every switch slower (a CPU without native bf16, say): each is timed once against fp32 eager, none again."""
    ts, _ = stand_in_ladder(monkeypatch, lambda overrides: 100.0 * 1.05 ** (len(overrides) - 4))
    rows = ts.greedy([], rounds=3, steps=1, warmup=1, device_type="cpu")
    names = [r["config"] for r in rows]
    assert names == ["fp32 eager", "+bf16 autocast", "+GEMM small convs", "+torch.compile", "+dual forward",
                     "fp32 eager (direct)"]  # fmt: skip
    assert [r["kept"] for r in rows[1:5]] == [False] * 4


def test_the_ladder_runs_on_the_configured_device_and_refuses_a_set_it_would_override(monkeypatch, capsys):
    """`--set perf.device=cpu` on a machine with CUDA times the CPU ladder (its CPU-only rungs, the CPU's ceiling);
    a --set of a switch the ladder sets itself is refused (exit 2) except with --compare; --quick keeps what the
    user gave; the modes exclude one another."""
    import torch
    import train_step as ts

    seen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        ts, "greedy", lambda base, rounds, steps, warmup, device_type, emit: seen.append(device_type) or []
    )
    monkeypatch.setattr(ts, "matmul_ceiling", lambda device: seen.append(device.type) or {
        "matmul_ceiling_tflops": 1.0, "matmul_ceiling_case": "stand-in"})  # fmt: skip
    monkeypatch.setattr(ts, "conv_ceiling", lambda cfg, device: {})
    monkeypatch.setattr(ts, "provenance", lambda device: {"cpu": "x", "cpu_native_bf16": False, "cpu_threads": 1})
    monkeypatch.setattr(ts, "append_jsonl", lambda path, rows: None)
    strict = []
    monkeypatch.setattr(ts, "greedy", lambda *a, **k: strict.append(torch._dynamo.config.fail_on_cache_limit_hit)
                        or seen.append(a[4]) or [])  # fmt: skip
    ts.main(["--set", "perf.device=cpu"])
    ts.main([])  # auto: the GPU this machine (says it) has
    assert seen == ["cpu", "cpu", "cuda", "cuda"]
    # rows at dynamo's recompile limit fail inside the benchmark, and the process's setting is as it was after
    assert strict == [True, True] and torch._dynamo.config.fail_on_cache_limit_hit is False
    for argv in (["--set", "perf.dtype=fp32"], ["--direct", "perf.compile=on", "--set", "perf.gemm_conv=8"],
                 ["--direct", "perf.compile=on", "--compare", "perf.kernels=off,on"]):  # fmt: skip
        with pytest.raises(SystemExit) as refused:
            ts.parse_args(argv)
        assert refused.value.code == 2
    assert "--compare perf.dtype=A,B" in capsys.readouterr().err
    assert ts.parse_args(["--set", "perf.dtype=fp32", "--compare", "perf.kernels=off,on"]).overrides
    quick = ts.parse_args(["--quick", "--rounds", "9"])
    assert (quick.rounds, quick.width, quick.batch_size) == (9, 16, 64)
    with pytest.raises(SystemExit) as bad:
        ts.run_cli(lambda: ts.main(["--set", "perf.device=tpu"]), "bench/train_step.py")
    assert bad.value.code == 2 and "perf.device" in capsys.readouterr().err


def test_the_ladder_refuses_bad_counts_rows_and_methods_in_one_line(capsys):
    """Counts below 1 and --rows that are no ladder indices or come without --cumulative end in argparse's one line,
    exit 2, before any row is built; --data-dir turns the synthetic fallback off (a wrong folder is an error, not
    synthetic figures)."""
    import train_step as ts

    cases = {
        ("--rounds", "0"): "must be at least 1",
        ("--steps", "0"): "must be at least 1",
        ("--cumulative", "--rows", "1,x"): "give ladder indices",
        ("--cumulative", "--rows", "9"): "the ladder's rows are 0-",
        ("--cumulative", "--quick", "--rows", str(len(ts.LADDER) - 1)): "the ladder's rows are 0-",
        ("--rows", "1"): "add --cumulative",
    }
    for argv, says in cases.items():
        with pytest.raises(SystemExit) as refused:
            ts.parse_args(list(argv))
        err = capsys.readouterr().err
        assert refused.value.code == 2 and says in err, (argv, err)
    assert ts.parse_args(["--cumulative", "--rows", "3,0,3"]).rows == [0, 3]
    base = ts.base_overrides(ts.parse_args(["--data-dir", "/nowhere", "--train-epochs", "1"]))
    assert "data.synthetic_fallback=false" in base and "data.dataset=cifar10" in base


def test_a_row_counts_recompiles_in_its_timed_rounds_and_warms_past_the_capture(monkeypatch):
    """A graph compiled while a row is timed (a recompile that slowed its figure) is reported on it, not only one
    in the profiled step after the rounds; with its attack captured, the warm-up runs past the capture."""
    import types
    from collections import Counter

    import train_step as ts

    counts = Counter(graphs=5, graph_breaks=0)
    monkeypatch.setattr(ts, "dynamo_counts", lambda: Counter(counts))
    monkeypatch.setattr(ts, "median_ms", lambda fn, device, n: [fn() for _ in range(n)] and 10.0)
    calls = []
    graphs = types.SimpleNamespace(warmup=2)
    perf = types.SimpleNamespace(device=types.SimpleNamespace(type="cpu"), attack_graphs=graphs, activate=lambda: None,
                                 autocast=None)  # fmt: skip
    run = types.SimpleNamespace(perf=perf, nets=None)
    monkeypatch.setattr(ts, "build_run", lambda cfg: run)
    monkeypatch.setattr(ts, "train_step", lambda r, x, y: calls.append("step"))
    monkeypatch.setattr(ts, "attack_inputs", lambda *a: calls.append("attack"))
    loader = [(None, None)]
    run.train_loader = loader
    row = ts.build_row("row", types.SimpleNamespace(attack=None, method=types.SimpleNamespace(name="arat")), warmup=1)
    assert calls.count("attack") >= graphs.warmup + 1  # the step's attack is a call of the captured attack too
    calls.clear()

    def step_that_recompiles():
        calls.append("step")
        if calls.count("step") == 4:  # the first step of round 2
            counts["graphs"] += 1

    monkeypatch.setattr(ts, "train_step", lambda r, x, y: step_that_recompiles())
    ts.interleave([row], rounds=2, steps=3)
    assert row.timed["graphs"] == 1 and len(row.step_ms) == 2


def test_releasing_a_row_drops_its_captured_attacks(monkeypatch):
    """A dropped row's captured attacks (graphs, static buffers, the network they hold) go with it, active or not."""
    import types

    import train_step as ts

    from engine.attacks import graphs

    released = []
    mine = types.SimpleNamespace(release=lambda: released.append("mine"))
    other = types.SimpleNamespace(release=lambda: released.append("other"))
    monkeypatch.setattr(graphs, "_active", mine)
    ts.release(types.SimpleNamespace(run=types.SimpleNamespace(perf=types.SimpleNamespace(attack_graphs=mine))))
    assert released == ["mine"] and graphs.active() is None
    graphs.set_attack_graphs(mine)
    ts.release(types.SimpleNamespace(run=types.SimpleNamespace(perf=types.SimpleNamespace(attack_graphs=other))))
    assert released == ["mine", "other"] and graphs.active() is mine


def test_bench_commands_refuse_bad_input_in_one_line(monkeypatch, capsys):
    """The harness's command wrapper: the engine's UserError is one line and exit 2 (no traceback); counts must be
    >= 1; a --device without CUDA names --device; loaders need two epochs and keep an --epochs given with --quick."""
    import argparse

    import harness
    import loaders
    import torch

    from engine.errors import UserError

    def bad():
        raise UserError("no such checkpoint")

    with pytest.raises(SystemExit) as stopped:
        harness.run_cli(bad, "bench/x.py")
    assert stopped.value.code == 2 and capsys.readouterr().err == "bench/x.py: no such checkpoint\n"
    with pytest.raises(SystemExit) as done:
        harness.run_cli(lambda: None, "bench/x.py")
    assert done.value.code is None  # exit status 0
    assert harness.positive_int("3") == 3
    for text in ("0", "-2", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            harness.positive_int(text)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="--device cuda: CUDA is not available here; use --device cpu"):
        harness.bench_device("cuda")
    assert harness.bench_device("auto").type == "cpu"
    assert loaders.parse_args(["--quick", "--epochs", "5"]).epochs == 5
    assert loaders.parse_args(["--quick"]).epochs == 2
    with pytest.raises(SystemExit) as one_epoch:
        loaders.parse_args(["--epochs", "1"])
    assert one_epoch.value.code == 2


def test_compare_methods_refuses_arrest_without_std(tmp_path):
    """ARREST fine-tunes the comparison's own std run: listed without it, the script stops before training anything."""
    (tmp_path / "data" / "cifar-10-batches-py").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k not in ("ARAT_DATA_DIR", "SEEDS", "EPOCHS", "AA_N", "ABLATIONS")}
    env |= {"METHODS": "at\tarrest", "DATA_DIR": str(tmp_path / "data")}
    proc = subprocess.run(["bash", str(REPO / "bench" / "compare_methods.sh"), str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and "arrest without std" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_aot_report_keeps_every_other_row_when_one_compile_fails(monkeypatch, tmp_path, capsys):
    """A kernel that fails to compile is a row with its error and a non-zero exit; the other kernels still report."""
    import types

    import aot_report

    import kernels

    def compile_spec(spec, arch):
        if spec["name"] == "broken":
            raise RuntimeError("PTX assembly failed\nptxas fatal: bad register")
        return {"kernel": spec["name"], "arch": f"sm_{arch}", "num_warps": 4, "registers": 32, "shared_bytes": 0,
                "local_bytes": 0, "spill_store_bytes": 0, "spill_load_bytes": 0, "nan_dropping_minmax": 0}  # fmt: skip

    specs = [{"name": "fine", "num_warps": 4}, {"name": "broken", "num_warps": 4}]
    stub = types.SimpleNamespace(compile_spec=compile_spec, all_specs=lambda: specs, ARCHS=(80, 90))
    monkeypatch.setattr(kernels, "aot", stub, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "aot.jsonl"
    assert aot_report.main(["--out", str(out)]) == 1
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["kernel"], r["arch"], "error" in r) for r in rows] == [
        ("fine", "sm_80", False),
        ("fine", "sm_90", False),
        ("broken", "sm_80", True),
        ("broken", "sm_90", True),
    ]
    assert rows[2]["error"] == "RuntimeError: ptxas fatal: bad register"
    assert all(r["device"] == "none (compiled ahead of time)" for r in rows)
    assert "FAILED: broken on sm_80" in capsys.readouterr().err


def test_autoattack_benches_take_the_networks_dataset_and_find_the_demo_run(tmp_path, monkeypatch):
    """A CIFAR-100 network is attacked on CIFAR-100's test images (its labels 0-99), not CIFAR-10's; the default
    model is the newest demo run, runs/demo (scripts/demo.sh's folder) as well as runs/demo-<date>."""
    import argparse

    import autoattack_bench as ab
    import torch

    from engine.config import ModelConfig
    from engine.models import build_model

    monkeypatch.chdir(tmp_path)
    for i, name in enumerate(("demo-20261201-000000", "demo")):
        final = tmp_path / "runs" / name / "checkpoints" / "final.pt"
        final.parent.mkdir(parents=True)
        net = build_model(ModelConfig(arch="resnet18", width=4), 100 if name == "demo" else 10)
        torch.save({"model": net.state_dict()}, final)
        os.utime(final, (1_000 + i, 1_000 + i))
    assert ab.newest_demo_run() == Path("runs/demo")
    seen = []
    monkeypatch.setattr(ab, "load_split", lambda dataset, data_dir, train: seen.append(dataset) or [0] * 7)
    args = argparse.Namespace(device="cpu", run=None, data_dir="d", num_examples=100)
    source, net, split, device = ab.model_and_test_split(args)
    assert seen == ["cifar100"] and args.num_examples == 7 and source == Path("runs/demo")
    args.run = tmp_path / "runs" / "demo-20261201-000000"
    ab.model_and_test_split(args)
    assert seen == ["cifar100", "cifar10"]


def test_aot_report_refuses_the_interpreter_and_a_missing_triton_in_one_line(monkeypatch, capsys):
    import builtins

    import aot_report

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(SystemExit) as interpreted:
        aot_report.run_cli(lambda: aot_report.main(["--out", "unused.jsonl"]), "bench/aot_report.py")
    assert interpreted.value.code == 2 and "unset TRITON_INTERPRET" in capsys.readouterr().err
    monkeypatch.delenv("TRITON_INTERPRET")
    real_import = builtins.__import__

    def no_triton(name, *args, **kwargs):
        if name in ("kernels.aot", "triton") or (name == "kernels" and "aot" in (args[2] or ())):
            raise ImportError("No module named 'triton'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_triton)
    with pytest.raises(SystemExit) as missing:
        aot_report.run_cli(lambda: aot_report.main(["--out", "unused.jsonl"]), "bench/aot_report.py")
    err = capsys.readouterr().err
    assert missing.value.code == 2 and "install a recent Triton" in err and len(err.strip().splitlines()) == 1, err
    monkeypatch.setattr(builtins, "__import__", real_import)
    # a Triton whose ASTSource predates the constexprs API (3.2, torch 2.6's): one line too, not a TypeError later
    triton_compiler = pytest.importorskip("triton.compiler")

    class OldASTSource:
        def __init__(self, fn, signature, constants=None, attrs=None): ...

    import kernels

    monkeypatch.setattr(triton_compiler, "ASTSource", OldASTSource)
    monkeypatch.delitem(sys.modules, "kernels.aot", raising=False)
    monkeypatch.delattr(kernels, "aot", raising=False)  # (`from kernels import aot` reads it first)
    with pytest.raises(SystemExit) as old:
        aot_report.run_cli(lambda: aot_report.main(["--out", "unused.jsonl"]), "bench/aot_report.py")
    err = capsys.readouterr().err
    assert old.value.code == 2 and "predates the constexprs API" in err and len(err.strip().splitlines()) == 1, err
    monkeypatch.delitem(sys.modules, "kernels.aot", raising=False)  # (imported again with the real one later)
    monkeypatch.delattr(kernels, "aot", raising=False)


def test_aa_dtype_runs_bf16_under_autocast_alternates_order_and_counts_differing_flags(tmp_path, monkeypatch):
    """In process, with AutoAttack replaced by a recorder: the bf16 row's network computes in bf16 (a convolution's
    output dtype inside it), the timed rounds alternate which dtype runs first, and the rows count exactly the
    images whose robust flags differ (not the fp32 flags against themselves)."""
    import aa_dtype
    import torch

    from engine.config import ModelConfig
    from engine.evaluate import pack
    from engine.models import build_model

    net = build_model(ModelConfig(arch="resnet18", width=4), 10).eval()
    conv_dtypes = []
    net.conv1.register_forward_hook(lambda module, args, out: conv_dtypes.append(out.dtype))
    n, differ = 16, 3
    flags = {"fp32": torch.zeros(n, dtype=torch.bool), "bf16": torch.zeros(n, dtype=torch.bool)}
    flags["bf16"][:differ] = True
    order = []

    def fake_evaluate(model, split, cfg, device, seed):
        dtype = "bf16" if isinstance(model, aa_dtype.Bf16) else "fp32"
        order.append(dtype)
        model(torch.rand(2, 3, 32, 32))
        result = {"accuracy": float(flags[dtype].float().mean()), "stages": {}, "num_examples": n}
        return {"aa": result | {"flags": pack(flags[dtype])}}

    monkeypatch.setattr(aa_dtype, "model_and_test_split", lambda args: ("tiny", net, None, torch.device("cpu")))
    monkeypatch.setattr(aa_dtype, "warm_up", lambda *a: None)
    monkeypatch.setattr(aa_dtype, "evaluate", fake_evaluate)
    out = tmp_path / "rows.jsonl"
    monkeypatch.setattr(sys, "argv", ["aa_dtype.py", "--num-examples", str(n), "--rounds", "3", "--out", str(out)])
    aa_dtype.main()
    assert order == ["fp32", "bf16", "bf16", "fp32", "fp32", "bf16"]
    assert conv_dtypes == [torch.bfloat16 if dtype == "bf16" else torch.float32 for dtype in order]
    fp32, bf16 = (json.loads(line) for line in out.read_text().splitlines())
    assert (fp32["dtype"], bf16["dtype"], fp32["flags_differ"], bf16["flags_differ"]) == ("fp32", "bf16", 3, 3)
    assert bf16["agreement"] == round(1 - differ / n, 4) and not bf16["passes"]
    assert (fp32["robust_accuracy"], bf16["robust_accuracy"]) == (0.0, differ / n)


@pytest.mark.slow
def test_aa_dtype_times_both_dtypes_in_alternating_rounds(tmp_path, cifar_dir):
    """bench/aa_dtype.py end to end on a tiny network: a row per dtype, each timed over the rounds (order
    alternating), the ratio on the bf16 row, and the flags compared image by image."""
    import torch

    from engine.config import ModelConfig
    from engine.models import build_model

    torch.manual_seed(0)
    ckpt = tmp_path / "tiny.pt"
    torch.save({"model": build_model(ModelConfig(arch="resnet18", width=4), 10).state_dict()}, ckpt)
    out = tmp_path / "rows.jsonl"
    cmd = [sys.executable, str(REPO / "bench" / "aa_dtype.py"), "--run", str(ckpt), "--data-dir", str(cifar_dir),
           "--num-examples", "8", "--batch-size", "8", "--rounds", "2", "--out", str(out)]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    fp32, bf16 = (json.loads(line) for line in out.read_text().splitlines())
    assert (fp32["dtype"], bf16["dtype"], fp32["rounds"], bf16["rounds"]) == ("fp32", "bf16", 2, 2)
    assert fp32["vs_fp32"] == 1.0 and bf16["vs_fp32"] > 0 and fp32["seconds"] > 0 and bf16["seconds"] > 0
    assert fp32["num_examples"] == 8 and 0 <= fp32["flags_differ"] <= 8 and fp32["cpu"]


def test_rows_appended_after_a_half_written_one_start_a_line_of_their_own(tmp_path):
    """A benchmark killed mid-row left a half line; the next appended onto it, and the file held a line no JSON
    reader takes in its middle. Now the next row starts a new line: every line but the half one reads."""
    from harness import append_jsonl

    out = tmp_path / "rows.jsonl"
    append_jsonl(out, [{"a": 1}])
    with out.open("a") as f:
        f.write('{"b": ')  # the kill
    append_jsonl(out, [{"c": 3}, {"d": 4}])
    lines = out.read_text().splitlines()
    assert lines[1] == '{"b": ' and [json.loads(line) for line in lines[2:]] == [{"c": 3}, {"d": 4}]
    append_jsonl(tmp_path / "new.jsonl", [{"e": 5}])
    append_jsonl(tmp_path / "new.jsonl", [{"f": 6}])  # a whole file: no blank line between the two appends
    assert (tmp_path / "new.jsonl").read_text() == '{"e": 5}\n{"f": 6}\n'


def _tiny_row(ts):
    """A real ladder row at width 8, batch 8, PGD-1 (seconds on a CPU), timed once by hand."""
    from engine.config import apply_overrides
    from engine.recipes import get_recipe

    overrides = ["model.width=8", "train.batch_size=8", "attack.num_steps=1", "data.dataset=synthetic",
                 "data.synthetic_size=8", "perf.compile=off"]  # fmt: skip
    row = ts.build_row("+CUDA graphs", apply_overrides(get_recipe("demo"), overrides), warmup=1)
    row.step_ms, row.attack_ms = [10.0], [5.0]
    return row


def test_a_row_whose_capture_failed_says_its_attacks_ran_eagerly(monkeypatch):
    """A failed capture runs the attacks eagerly from then on: its row kept the captured name and cuda_graphs=True
    (the flag says only that the graphs object exists); the greedy ladder could keep it. Now the row says so under
    a name of its own, with the capture's counts, and the ladder never keeps it."""
    import types

    import train_step as ts

    monkeypatch.setattr(ts, "profile_call", lambda fn, device, ms: {})
    row = _tiny_row(ts)
    stats = {"captures": 0, "replays": 0, "eager_calls": 2, "broken": True, "attacks": 1, "uncapturable_attacks": 0}
    row.run.perf.attack_graphs = types.SimpleNamespace(stats=lambda: stats)
    reported = ts.report(row)
    assert reported["config"] == "+CUDA graphs (capture failed: attacks ran eagerly)"
    assert reported["captured"] is False and reported["cuda_graphs"] == stats
    stats.update(captures=1, replays=9, eager_calls=0, broken=False)
    assert ts.report(row)["captured"] is True and ts.report(row)["config"] == "+CUDA graphs"
    row.run.perf.attack_graphs = None
    assert ts.report(row)["captured"] is None  # not graphed at all
    # the greedy ladder: a faster row whose capture failed is not kept
    stand_in, _ = stand_in_ladder(monkeypatch, lambda overrides: 100.0 * 0.5 ** len(overrides))
    monkeypatch.setattr(stand_in, "report", lambda r: {"config": r.name, "step_ms": r.step_ms[0], "captured": False})
    rows = stand_in.greedy([], rounds=1, steps=1, warmup=1, device_type="cpu")
    assert [r["kept"] for r in rows[1:5]] == [False] * 4


def test_the_ladder_never_keeps_a_compiled_row_whose_code_ran_eagerly(monkeypatch):
    """A frame dynamo gives up on (its recompile limit hit, rows adding cache entries in one process) runs eagerly
    from then on; that row timed eager code under the compiled name, and the ladder could keep it (helper-112)."""
    stand_in, _ = stand_in_ladder(monkeypatch, lambda overrides: 100.0 * 0.5 ** len(overrides))
    monkeypatch.setattr(stand_in, "report", lambda r: {"config": r.name, "step_ms": r.step_ms[0], "eager_frames": 1})
    rows = stand_in.greedy([], rounds=1, steps=1, warmup=1, device_type="cpu")
    assert [r["kept"] for r in rows[1:5]] == [False] * 4
    monkeypatch.setattr(stand_in, "report", lambda r: {"config": r.name, "step_ms": r.step_ms[0], "eager_frames": 0})
    assert stand_in.greedy([], rounds=1, steps=1, warmup=1, device_type="cpu")[1]["kept"] is True


def test_comparing_grad_sim_keeps_saved_tensors_before_any_row_compiles(monkeypatch):
    """Building a grad-sim row drops the graphs compiled so far (engine.analysis.keep_saved_tensors): the rows
    built before it recompiled in their timed rounds (helper-114). It is called once, before the first row."""
    import train_step as ts

    calls = []
    monkeypatch.setattr(ts, "keep_saved_tensors", lambda: calls.append("keep"))

    def build_row(name, cfg, warmup):
        calls.append(name)
        raise RuntimeError("stand-in")

    monkeypatch.setattr(ts, "build_row", build_row)
    rows = ts.compare([], "analysis.grad_sim", ["false", "true"], rounds=1, steps=1, warmup=1)
    assert calls == ["keep", "analysis.grad_sim=false", "analysis.grad_sim=true"] and len(rows) == 2
    calls.clear()
    ts.compare([], "perf.dual_forward", ["false", "true"], rounds=1, steps=1, warmup=1)
    assert "keep" not in calls


def test_grad_sim_rows_get_no_ar_at_cost_model():
    """analysis.grad_sim adds two backwards a step, which METHOD 9's model leaves out: such a row got AR-AT's
    TFLOP/s (a wrong figure under the right name). Now None, as another method's row."""
    import types

    import train_step as ts

    ns = types.SimpleNamespace
    cfg = ns(method=ns(name="arat"), analysis=ns(grad_sim=True))
    row = ts.Row("grad-sim", cfg, run=None, x=None, y=None)
    assert row.arat and set(ts.cost_figures(row, 1000.0).values()) == {None}


def test_a_failing_rung_is_a_row_and_rows_are_written_as_they_come(monkeypatch):
    """A rung that raised (a compile error, out of memory) ended the whole ladder, every row lost (they were written
    at the end). Now it is a failed row and the ladder goes on; and each row is handed on as it is made, so a ladder
    stopped part-way keeps the rows it finished."""
    import train_step as ts

    stand_in, _ = stand_in_ladder(monkeypatch, lambda overrides: 100.0 * 0.9 ** len(overrides))
    build = stand_in.build_row

    def build_row(name, cfg, warmup):
        if name == "+GEMM small convs":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")
        if name == "+dual forward":
            raise KeyboardInterrupt  # the ladder stopped here
        return build(name, cfg, warmup)

    monkeypatch.setattr(stand_in, "build_row", build_row)
    emitted = []
    with pytest.raises(KeyboardInterrupt):
        ts.greedy([], rounds=1, steps=1, warmup=1, device_type="cpu", emit=emitted.append)
    assert [r["config"] for r in emitted] == ["fp32 eager", "+bf16 autocast", "+GEMM small convs", "+torch.compile"]
    failed = emitted[2]
    assert failed["kept"] is False
    assert failed["failed"] == "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"


def test_rows_say_whether_the_tree_had_uncommitted_changes(tmp_path, monkeypatch):
    """The commit stamp alone named a clean commit for rows run from an edited tree."""
    import harness

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "f.py").write_text("a = 1\n")
    git("add", "f.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "x")
    monkeypatch.setattr(harness, "REPO", tmp_path)
    (tmp_path / "untracked.txt").write_text("not code the rows ran")
    clean = harness.provenance("cpu")
    assert clean["commit"] and clean["dirty"] is False and clean["cuda"] is None
    (tmp_path / "f.py").write_text("a = 2\n")
    assert harness.provenance("cpu")["dirty"] is True


def test_autoattack_bench_attacks_both_paths_under_the_same_kernel_settings(monkeypatch):
    """The chunked path attacks under repeatable_kernels (cuDNN deterministic, no autotuning); the per-batch path
    did not, so on CUDA the ratio mixed algorithm choice in."""
    import types

    import autoattack_bench
    import torch

    seen = []

    def adversary(*args, **kwargs):
        seen.append((torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark))
        return types.SimpleNamespace(verbose=True, run_standard_evaluation=lambda x, y, batch_size: (x, y))

    monkeypatch.setattr(autoattack_bench.autoattack, "adversary", adversary)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 10))
    accuracy = autoattack_bench.per_batch(net, torch.rand(4, 3, 2, 2), torch.arange(4), "standard", 2)
    assert accuracy == 1.0 and seen == [(True, False)] * 2
    assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == (False, True)  # given back


def test_a_loader_backend_that_cannot_run_here_leaves_a_row_saying_so(tmp_path, monkeypatch, cifar_dir):
    """An FFCV or DALI not installed was printed and dropped: the rows showed no gap."""
    import loaders

    monkeypatch.setattr(loaders.backends, "available", lambda name: False)
    out = tmp_path / "rows.jsonl"
    loaders.main(["--backends", "dali", "--quick", "--data-dir", str(cifar_dir), "--device", "cpu", "--out", str(out)])
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["backend"] == "dali" and row["skipped"] and row["cpu"]


def test_the_base_row_is_reported_when_rungs_fail(monkeypatch):
    """The base row (fp32 eager) was written with the first rung that ran: after a first rung that failed, never;
    with every rung failed, neither (the branch for it could not run)."""
    stand_in, _ = stand_in_ladder(monkeypatch, lambda overrides: 100.0 * 0.9 ** len(overrides))
    build = stand_in.build_row
    failing = {"+bf16 autocast"}

    def build_row(name, cfg, warmup):
        if name in failing:
            raise RuntimeError("refused")
        return build(name, cfg, warmup)

    monkeypatch.setattr(stand_in, "build_row", build_row)
    names = [r["config"] for r in stand_in.greedy([], rounds=1, steps=1, warmup=1, device_type="cpu")]
    assert names[:2] == ["+bf16 autocast", "fp32 eager"] and names.count("fp32 eager") == 1
    failing.update(name for name, _ in STAND_IN_LADDER[1:])
    emitted = []
    rows = stand_in.greedy([], rounds=1, steps=1, warmup=1, device_type="cpu", emit=emitted.append)
    assert rows[0]["config"] == "fp32 eager" and rows[0]["kept"] and all(r.get("failed") for r in rows[1:-1])
    assert sorted(r["config"] for r in emitted) == sorted(r["config"] for r in rows)  # each written once


def test_the_direct_row_keeps_a_failed_capture_s_name(monkeypatch):
    """direct_check's name replaced the report's, dropping "(capture failed: ...)"."""
    import types

    import train_step as ts

    best = types.SimpleNamespace(
        name="+CUDA graphs", step_ms=[], attack_ms=[], timed=types.SimpleNamespace(clear=lambda: None)
    )
    reference = types.SimpleNamespace(name="fp32 eager", step_ms=[], attack_ms=[])
    monkeypatch.setattr(ts, "build_row", lambda name, cfg, warmup: reference)
    monkeypatch.setattr(ts, "apply_overrides", lambda cfg, overrides: None)
    monkeypatch.setattr(ts, "get_recipe", lambda name: None)
    monkeypatch.setattr(ts, "release", lambda row: None)

    def interleave(rows, rounds, steps):
        for row, ms in zip(rows, (20.0, 10.0), strict=True):
            row.step_ms.append(ms)

    monkeypatch.setattr(ts, "interleave", interleave)
    monkeypatch.setattr(ts, "report", lambda row: {"config": row.name + " (capture failed: attacks ran eagerly)",
                                                  "captured": False})  # fmt: skip
    row = ts.direct_check(best, [], rounds=1, steps=1, warmup=1)
    assert row["config"] == "+CUDA graphs (capture failed: attacks ran eagerly) (direct vs fp32 eager)"
    assert row["captured"] is False and row["vs_fp32_eager"] == 2.0


def test_a_direct_configuration_that_fails_is_a_failed_row(monkeypatch, capsys):
    """`--direct` (one configuration) that raised ended in a traceback with nothing written; now a failed row, as the
    ladder's rungs, and exit status 1 (nothing measured). A bad key stays one line, exit 2."""
    import train_step as ts

    from engine.errors import UserError

    written = []

    def broken(name, cfg, warmup):
        raise RuntimeError("CUDA out of memory. Tried to allocate 9.00 GiB")

    monkeypatch.setattr(ts, "build_row", broken)
    monkeypatch.setattr(ts, "matmul_ceiling", lambda device: {"matmul_ceiling_tflops": 1.0, "matmul_ceiling_case": "x"})
    monkeypatch.setattr(ts, "conv_ceiling", lambda cfg, device: {})
    monkeypatch.setattr(ts, "provenance", lambda device: {"cpu": "x", "cpu_native_bf16": False, "cpu_threads": 1})
    monkeypatch.setattr(ts, "append_jsonl", lambda path, rows: written.extend(rows))
    assert ts.main(["--direct", "perf.channels_last=true"]) == 1
    (row,) = written
    assert row["config"] == "perf.channels_last=true (direct vs fp32 eager)" and "out of memory" in row["failed"]
    with pytest.raises(UserError):
        ts.main(["--direct", "perf.no_such_key=1"])


def test_kernels_bench_rows_say_how_they_were_timed_and_gpu_times_come_from_graph_replays(tmp_path, monkeypatch):
    """bench/kernels_bench.py on the CPU end to end (each row: its timing, GB/s = bytes / median time), and its CUDA
    timing on stand-ins: replays of a captured call, else one call between events, each row saying which (one call
    counts the host's launch gaps: the H200's eager dual BN forward read 684 us that way, 293 us in a graph)."""
    import kernels_bench
    import torch

    out = tmp_path / "kernels.jsonl"
    kernels_bench.main(["--quick", "--device", "cpu", "--reps", "2", "--warmup", "0", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines() if '"op"' in line]
    ops = {r["op"] for r in rows}
    assert ops == {"pgd_step", "dual_bn fwd", "dual_bn fwd+bwd"} and all(r["cpu"] for r in rows)
    for r in rows:
        assert r["timing"] == "perf_counter" and r["median_ms"] > 0
        assert r["gb_per_s"] == pytest.approx(r["bytes"] / r["median_ms"] / 1e6)
    pgd = next(r for r in rows if r["op"] == "pgd_step")
    assert pgd["bytes"] == 4 * 16 * 3 * 32 * 32 * 4  # read x, x_adv, grad, write out: fp32 on the CPU

    pytest.importorskip("triton")
    import triton.testing

    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", lambda fn, **kw: 0.293)
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: 0.684)
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)  # (no GPU here)
    assert kernels_bench.timed(lambda: None, cuda, 0, 1) == (0.293, "cuda graph")

    def not_capturable(fn, **kw):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", not_capturable)
    assert kernels_bench.timed(lambda: None, cuda, 0, 1) == (
        0.684,
        "one call (do_bench; not captured: RuntimeError: operation not permitted when stream is capturing)",
    )
