"""The performance switches change speed, not results: each against the plain path on the same step."""

import contextlib
import copy
import dataclasses

import pytest
import torch
from precision import assert_near_reference, perturbed, torch_threads

from engine.config import apply_overrides
from engine.train import build_run, train_step

# No attack steps: PGD's sign() would turn last-bit differences into other adversarial examples. cuDNN autotuning
# off (and, in conftest, TF32 off and deterministic cuDNN) so that on CUDA the test checks the engine, not cuDNN.
EXACT = ["perf.dtype=fp32", "attack.num_steps=0", "attack.start=none", "train.epochs=1", "perf.cudnn_benchmark=off"]
PLAIN = [
    "perf.channels_last=false",
    "perf.dual_forward=false",
    "perf.kernels=off",
    "perf.compile=false",
    "perf.gemm_conv=0",
]


def one_step(cfg, dtype=torch.float32, probe=False):
    """Loss, parameter gradients and BN buffers after one training step from the same state and batch."""
    run = build_run(cfg)
    run.nets.raw.to(dtype)
    run.method.to(dtype)
    torch.manual_seed(0)
    x, y = next(iter(run.train_loader))
    x = perturbed(x.to(dtype)) if probe else x.to(dtype)
    loss = train_step(run, x, y)["loss"]
    grads = {k: p.grad.clone() for k, p in run.nets.raw.named_parameters()}
    return loss, grads, {k: b.clone() for k, b in run.nets.raw.named_buffers()}


def assert_same_step(cfg_plain, cfg_fast):
    """The fast path's loss, gradients and BN statistics sit as close to a float64 run of the plain path as the
    plain fp32 path does (tests/precision.py): at initialization a deep BN network amplifies summation-order
    differences (~1e-7) on the way back to the first layers (a few % at conv1 on some CPUs, ~1e-5 at layer4)."""
    loss_a, grads_a, buffers_a = one_step(cfg_plain)
    loss_b, grads_b, buffers_b = one_step(cfg_fast)
    reference = apply_overrides(cfg_plain, PLAIN)
    loss_r, grads_r, buffers_r = one_step(reference, torch.float64)
    loss_p, grads_p, buffers_p = one_step(reference, torch.float64, probe=True)
    assert_near_reference("loss", loss_b, loss_a, loss_r, loss_p, floor=1e-5)
    for k, g in grads_r.items():
        assert_near_reference(f"{k} gradient", grads_b[k], grads_a[k], g, grads_p[k], floor=1e-5)
    for k, b in buffers_r.items():
        if b.is_floating_point():
            assert_near_reference(k, buffers_b[k], buffers_a[k], b, buffers_p[k], floor=1e-4)  # means near 0
        else:
            assert torch.equal(buffers_a[k], buffers_b[k]), k


def network_inputs(cfg) -> list[tuple[int, bool]]:
    """(batch size, channels-last) of every input the network got in one training step: the switch took effect."""
    run = build_run(cfg)
    seen = []
    run.nets.raw.register_forward_pre_hook(
        lambda _, args: seen.append((len(args[0]), args[0].is_contiguous(memory_format=torch.channels_last)))
    )
    x, y = next(iter(run.train_loader))
    train_step(run, x, y)
    assert seen, "the network was never called"
    return seen


def test_dual_forward_equals_two_passes(tiny_cfg):
    base = apply_overrides(tiny_cfg, EXACT)
    two, dual = (apply_overrides(base, [f"perf.dual_forward={on}"]) for on in ("false", "true"))
    batch = base.batch_size
    assert {n for n, _ in network_inputs(dual)} == {2 * batch}  # clean and adversarial halves in one pass
    assert {n for n, _ in network_inputs(two)} == {batch}
    assert_same_step(two, dual)


def fused_backend() -> str:
    """The backend `perf.kernels=on` runs the fused ops on here: Triton on CUDA, the native library on a CPU (the
    test is skipped where it is not built: the ops would run their plain-torch reference, the path compared with)."""
    import kernels

    if torch.cuda.is_available():
        return "triton"
    if not kernels.load_native():
        pytest.skip("the native CPU library is not built (bash scripts/build_native.sh): nothing fused to compare")
    return "native"


def test_fused_kernels_equal_plain_path(tiny_cfg, monkeypatch):
    import kernels

    backend = fused_backend()
    monkeypatch.setattr(kernels._dispatch, "_last", {})  # what this test's calls used, not an earlier test's
    base = apply_overrides(tiny_cfg, EXACT)
    assert_same_step(apply_overrides(base, ["perf.kernels=off"]), apply_overrides(base, ["perf.kernels=on"]))
    used = kernels.last_backend()
    assert used.get("dual_batch_norm") == backend and used.get("dual_batch_norm_backward") == backend, used


def test_fused_kernels_in_the_attack(tiny_cfg, monkeypatch):
    """With attack steps, the fused PGD step runs and gives the attack of the plain step."""
    import kernels
    from engine.attacks import pgd, set_step_kernel

    backend = fused_backend()
    monkeypatch.setattr(kernels._dispatch, "_last", {})
    run = build_run(apply_overrides(tiny_cfg, ["perf.kernels=on", "perf.cuda_graphs=off"]))
    assert backend in run.perf.kernels, run.perf.kernels
    x, y = next(iter(run.train_loader))
    attack = dataclasses.replace(run.cfg.attack, num_steps=3)
    try:
        torch.manual_seed(1)
        fused = pgd(run.nets.raw, x, y, attack, bn="adv", train=False)
        assert kernels.last_backend().get("pgd_step") == backend, kernels.last_backend()
        set_step_kernel(None)
        torch.manual_seed(1)
        plain = pgd(run.nets.raw, x, y, attack, bn="adv", train=False)
    finally:
        set_step_kernel(None)
    assert (fused - x).abs().max() > attack.step_size / 2  # the attack moved
    torch.testing.assert_close(fused, plain)


def test_gemm_convolutions_equal_the_plain_path(tiny_cfg):
    base = apply_overrides(tiny_cfg, EXACT + ["perf.device=cpu"])
    switched = apply_overrides(base, ["perf.gemm_conv=8"])
    assert build_run(switched).perf.gemm_convs.startswith("8 (8 convs")  # not vacuous: layer3 + layer4 switched
    assert_same_step(apply_overrides(base, ["perf.gemm_conv=0"]), switched)


@pytest.mark.slow
def test_compiled_gemm_convolutions_equal_eager(tiny_cfg):
    base = apply_overrides(tiny_cfg, EXACT + ["perf.device=cpu", "perf.gemm_conv=4"])
    assert_same_step(base, apply_overrides(base, ["perf.compile=true"]))


def test_channels_last_equals_contiguous(tiny_cfg):
    base = apply_overrides(tiny_cfg, EXACT)
    contiguous, channels_last = (apply_overrides(base, [f"perf.channels_last={on}"]) for on in ("false", "true"))
    assert {cl for _, cl in network_inputs(channels_last)} == {True}
    assert {cl for _, cl in network_inputs(contiguous)} == {False}
    assert_same_step(contiguous, channels_last)


@pytest.mark.slow
@pytest.mark.parametrize("threads", ["as set", 1])
def test_compile_equals_eager(tiny_cfg, threads):
    """At one thread Inductor's C++ for one thread gave NaN gradients here (engine.perf.inductor_options)."""
    with torch_threads(torch.get_num_threads() if threads == "as set" else threads):
        base = apply_overrides(tiny_cfg, EXACT)
        assert_same_step(base, apply_overrides(base, ["perf.compile=true"]))


def fixed_attack(model, x, y, cfg, **_):
    """A stand-in for PGD: x moved by eps along a fixed +-1 pattern, the same in every dtype and on every path (PGD's
    sign() would turn last-bit differences into other adversarial examples), so the objectives see x' != x."""
    index = torch.arange(x[0].numel(), device=x.device, dtype=x.dtype).reshape(x.shape[1:])
    return (x + cfg.eps * torch.sign(torch.sin(index) + 0.5)).clamp(0, 1)


# The objectives whose compiled code differs from AR-AT's: TRADES' single-BN pair with its KL term, MART's weighted
# KL, LBGAT's two networks (a clean model compiled beside the robust one), AR-AT's asymmetric invariance on x' != x,
# AT's single-BN cross-entropy on x' alone, std's on x (ARREST's pre-training step is std's), ARREST's fine-tuning
# (its teacher compiled beside the student, the feature cosine, the replay check's no-grad forward; the replay
# itself never fires here: it would draw a random start, whose float64 draw differs from fp32's).
OBJECTIVES = {
    "arat": [], "trades": [], "mart": [], "lbgat": [], "at": [], "std": [],
    "arrest": ["method.pretrain_epochs=1", "train.epochs=2", "method.replay_cos=-1"],
}  # fmt: skip
SMOKE_SHAPE = ["data.dataset=synthetic", "data.synthetic_size=64", "model.width=8", "train.batch_size=32"]


@pytest.mark.slow
@pytest.mark.parametrize("method", list(OBJECTIVES))
def test_compiled_objectives_equal_eager(method, monkeypatch):
    """Inductor's code for each training objective on an adversarial batch (the attack held fixed), against eager
    and float64 as test_compile_equals_eager does. On CUDA (the GPU check's probes) perf.kernels is on: the fused
    dual-BN op runs inside Inductor's graphs, TRADES' single-BN pair included."""
    import test_perf

    from engine.methods import arat, arrest, mart, trades
    from engine.recipes import get_recipe

    # fresh caches: dynamo does not guard on module hooks (skip_nnmodule_hook_guards), so ARREST's networks, whose
    # feature hooks the engine registers before compiling, would reuse another case's graphs and skip them
    torch._dynamo.reset()
    for module in (arat, mart, trades, arrest):  # LBGAT attacks through trades.trades_attack, AT through arat's
        monkeypatch.setattr(module, "pgd", fixed_attack)
    if method == "arrest":  # the step of the first fine-tuning epoch, its teacher the network as it starts
        runs = []

        def fine_tuning(cfg, built=build_run):
            run = built(cfg)
            run.method.epoch = cfg.method.pretrain_epochs + 1
            run.method.snapshot_teacher(run.nets.raw)
            runs.append(run)
            return run

        def pre_training(*_):
            raise AssertionError("ARREST took its pre-training step")

        monkeypatch.setattr(test_perf, "build_run", fine_tuning)
        monkeypatch.setattr(arrest, "natural_step", pre_training)
    overrides = SMOKE_SHAPE + EXACT + OBJECTIVES[method] + ["attack.start=none", "perf.compile=false"]
    cfg = apply_overrides(get_recipe(f"{method}-resnet18-cifar10"), overrides)
    try:
        assert_same_step(cfg, apply_overrides(cfg, ["perf.compile=true"]))
    finally:
        torch._dynamo.reset()  # no graph with this case's hooks left for a later test in this process
    if method == "arrest":  # plain, compiled, the two float64 runs: the compiled one's teacher compiled too
        from engine.attacks.pgd import is_compiled

        assert [is_compiled(r.method.runner("teacher")) for r in runs] == [False, True, False, False]


@pytest.mark.slow
def test_inductor_compiled_attack_gradient_equals_eager():
    """The attack's own role compiled by Inductor (weights frozen: the input gradient only; batch norm in training
    mode on the adv branch, as training's attack runs it): the input gradient PGD takes signs of sits as near a
    float64 run as eager's does, with the weights frozen while it runs. The compiled training tests above hold the
    attack fixed (PGD's signs would amplify last-bit differences), so only this one checks the attack's graphs."""
    from engine.attacks.pgd import frozen, input_gradient, is_compiled, mode
    from engine.config import ModelConfig, PerfConfig
    from engine.models import build_model
    from engine.perf import AttackForward, role

    torch.manual_seed(0)
    net = build_model(ModelConfig(width=8), 10)
    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
    compiled = role(AttackForward, net, PerfConfig(compile="on"), torch.device("cpu"))
    assert is_compiled(compiled)

    def gradient(model, inputs):
        with mode(model, True), frozen(model) if is_compiled(model) else contextlib.nullcontext():
            if is_compiled(model):  # traced with the weights frozen: a backward of the input gradient only
                assert not any(p.requires_grad for p in net.parameters())
            return input_gradient(model, inputs, y, "adv", None, None)

    net64 = copy.deepcopy(net).double()
    ref, probe = gradient(net64, x.double()), gradient(net64, perturbed(x.double()))
    got, plain = gradient(compiled, x), gradient(net, x)
    assert_near_reference("attack input gradient", got, plain, ref, probe, floor=1e-5)
    assert all(p.requires_grad for p in net.parameters())  # given back after the attack


@pytest.mark.slow
def test_inductor_compiled_evaluation_forwards_equal_eager():
    """The evaluation's two roles compiled by Inductor, on a network whose BN statistics are trained (not the
    identity of a fresh one): the no-grad predictions' logits (clean accuracy, AutoAttack's checks) and the input
    gradient the evaluation's attacks take (eval-mode BN, PGD-20's cross-entropy) sit as near float64 as eager's."""
    from engine.attacks.pgd import is_compiled
    from engine.config import ModelConfig, PerfConfig
    from engine.models import build_model
    from engine.perf import eval_network

    torch.manual_seed(0)
    net = build_model(ModelConfig(width=8), 10)
    with torch.no_grad():  # running statistics of a few batches, on both branches
        for _ in range(3):
            net(torch.rand(32, 3, 32, 32), bn="adv"), net(torch.rand(32, 3, 32, 32), bn="clean")
    net.eval()
    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
    perf = PerfConfig(compile="on")
    predict, attack = (eval_network(net, perf, torch.device("cpu"), attack=a) for a in (False, True))
    assert is_compiled(predict) and is_compiled(attack)

    def logits(model, inputs, bn):
        with torch.no_grad():
            return model(inputs, bn=bn)

    def gradient(model, inputs):
        inputs = inputs.clone().requires_grad_(True)
        return torch.autograd.grad(torch.nn.functional.cross_entropy(model(inputs).float(), y), inputs)[0]

    net64 = copy.deepcopy(net).double()
    for bn in ("adv", "clean"):
        ref, probe = logits(net64, x.double(), bn), logits(net64, perturbed(x.double()), bn)
        assert_near_reference(f"{bn} logits", logits(predict, x, bn), logits(net, x, bn), ref, probe, floor=1e-6)
    ref, probe = gradient(net64, x.double()), gradient(net64, perturbed(x.double()))
    assert_near_reference("evaluation input gradient", gradient(attack, x), gradient(net, x), ref, probe, floor=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("mode", ["default", "max-autotune-no-cudagraphs"])
@pytest.mark.parametrize("compiles", [True, False])
def test_one_cpu_thread_compiles_for_any_thread_count(threads, mode, compiles, monkeypatch):
    """Except under torch 2.7 (`compiles` False), whose C++ for any thread count does not compile."""
    from engine import perf
    from engine.config import PerfConfig

    monkeypatch.setattr(perf, "dynamic_threads_compile", lambda: compiles)
    with torch_threads(threads):
        cpu = perf.inductor_options(PerfConfig(compile_mode=mode), torch.device("cpu"))
        cuda = perf.inductor_options(PerfConfig(compile_mode=mode), torch.device("cuda"))
    plain = {} if mode == "default" else {"mode": mode}
    assert cuda == plain
    if threads == 2:
        assert cpu == plain
    elif not compiles:
        assert "cpp.dynamic_threads" not in cpu.get("options", {}) and "mode" not in cpu
        assert (cpu.get("options", {}).get("max_autotune") is True) == (mode != "default")
    else:
        assert cpu["options"]["cpp.dynamic_threads"] is True and "mode" not in cpu  # torch.compile: mode or options
        assert (cpu["options"].get("max_autotune") is True) == (mode != "default")  # the mode's own options kept


def test_torch_2_7_alone_compiles_no_code_for_any_thread_count():
    from engine.perf import dynamic_threads_compile

    versions = ["2.6.0+cpu", "2.7.0", "2.7.1+cu126", "2.8.0+cu128", "2.13.0+cpu", "2.14.1"]
    assert [dynamic_threads_compile(v) for v in versions] == [True, False, False, True, True, True]


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_follows_the_cpu(monkeypatch, native):
    from engine import perf

    monkeypatch.setattr(perf, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(perf.platform, "machine", lambda: "x86_64")  # (an ARM host is told otherwise: below)
    dtype, why = perf.resolve_dtype("auto", torch.device("cpu"))
    assert dtype == (torch.bfloat16 if native else torch.float32)
    assert why.startswith("auto") and ("no native" in why) != native


@pytest.mark.parametrize("machine", ["aarch64", "arm64"])
def test_an_arm_cpu_gets_fp32_without_being_called_an_emulator(monkeypatch, machine):
    """bf16 is detected with x86 queries only: an ARM CPU (Graviton, Apple M2+: bf16 in hardware) gets fp32 under
    auto, told that bf16 was not measured there rather than that it is emulated; bf16 set by hand: no x86 warning."""
    from engine import perf

    monkeypatch.setattr(perf, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(perf.platform, "machine", lambda: machine)
    dtype, why = perf.resolve_dtype("auto", torch.device("cpu"))
    assert dtype == torch.float32 and "x86 CPUs only" in why and "emulated" not in why
    dtype, why = perf.resolve_dtype("bf16", torch.device("cpu"))
    assert dtype == torch.bfloat16 and "not measured" in why and "emulates" not in why
    monkeypatch.setattr(perf.platform, "machine", lambda: "x86_64")
    assert "emulates bf16" in perf.resolve_dtype("bf16", torch.device("cpu"))[1]


@pytest.mark.parametrize("name", ["mps", "mps:0", "meta", "xpu"])
def test_a_device_other_than_cpu_or_cuda_is_refused_in_one_line(name):
    """Apple's MPS (or any other torch device type) is refused where the device is read, before a network or data
    is loaded (arat eval --device mps had loaded both, then failed naming perf.device)."""
    from engine.config import ConfigError
    from engine.perf import resolve_device

    with pytest.raises(ConfigError, match=f"device {name}: this engine runs on cpu or cuda.*arat eval: --device cpu"):
        resolve_device(name)


def test_macs_get_a_cpu_key_of_their_own(monkeypatch):
    """Without /proc/cpuinfo (macOS) the CPU key hashed an empty string: every Mac shared one evaluation-chunk key.
    It hashes sysctl's CPU name there."""
    import subprocess

    from engine import compile_cache

    monkeypatch.setattr(compile_cache, "cpuinfo", lambda *keys: "")
    monkeypatch.setattr(compile_cache.sys, "platform", "darwin")
    keys = []
    for brand in ("Apple M1", "Apple M4 Max"):
        monkeypatch.setattr(subprocess, "run", lambda *a, brand=brand, **k: subprocess.CompletedProcess(a, 0, brand))
        assert compile_cache.mac_cpu() == brand
        keys.append(compile_cache.cpu_key())
    assert keys[0] != keys[1]
    monkeypatch.setattr(compile_cache.sys, "platform", "linux")
    assert compile_cache.mac_cpu() == ""


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_follows_the_gpu(monkeypatch, native):
    from engine import perf

    monkeypatch.setattr(perf, "cuda_has_native_bf16", lambda device: native)
    dtype, _ = perf.resolve_dtype("auto", torch.device("cuda"))
    assert dtype == (torch.bfloat16 if native else torch.float16)


def test_explicit_bf16_on_an_emulating_cpu_warns_in_the_start_line(monkeypatch, tiny_cfg):
    from engine import perf
    from engine.train import start_line

    monkeypatch.setattr(perf, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(perf.platform, "machine", lambda: "x86_64")
    run = build_run(apply_overrides(tiny_cfg, ["perf.dtype=bf16", "perf.device=cpu"]))
    assert run.perf.dtype == torch.bfloat16 and "emulates bf16" in start_line(run)
    run = build_run(apply_overrides(tiny_cfg, ["perf.device=cpu"]))  # the smoke recipe keeps the default: auto
    assert run.perf.dtype == torch.float32 and "no native bf16" in start_line(run)


def test_the_start_line_says_the_seed_the_folder_and_the_engine_s_version(monkeypatch, tiny_cfg):
    """A log alone reproduces a run: the start line names its seed, its folder (the default one is named from the
    clock) and the engine's commit, marked where the checkout had uncommitted changes."""
    from pathlib import Path

    from engine import rundir
    from engine.train import start_line

    run = build_run(apply_overrides(tiny_cfg, ["perf.device=cpu", "train.seed=7"]))
    monkeypatch.setattr(rundir, "git_commit", lambda: "0123456789abcdef")
    for dirty, says in ((False, "(commit 0123456789ab), torch"), (True, "(commit 0123456789ab, with uncommitted")):
        monkeypatch.setattr(rundir, "git_dirty", lambda dirty=dirty: dirty)
        first, second = start_line(run, Path("runs/x")).splitlines()[:2]
        assert " seed=7 out=runs/x (its config.json holds every setting)" in first
        assert second.startswith("arat ") and says in second and f"torch {torch.__version__}" in second


def test_git_is_asked_once_per_process(monkeypatch):
    """The start line and env.json each asked git for the commit and the checkout's state (four git processes at a
    run's start, under torchrun on rank 0): now once per process, whose code is the code it imported."""
    import subprocess

    from engine import rundir

    calls = []
    run = subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda cmd, *a, **k: calls.append(cmd[0]) or run(cmd, *a, **k))
    rundir.git_commit.cache_clear(), rundir.git_dirty.cache_clear()
    first = rundir.version_line()
    env = rundir.environment(torch.device("cpu"))
    assert calls.count("git") == 2 and rundir.version_line() == first and calls.count("git") == 2
    assert env["git_commit"] == rundir.git_commit() and env["git_dirty"] == rundir.git_dirty()


def test_auto_switches_are_on_for_cuda_only():
    from engine.perf import resolve_switch

    assert resolve_switch("auto", torch.device("cuda")) and not resolve_switch("auto", torch.device("cpu"))
    assert resolve_switch("on", torch.device("cpu")) and not resolve_switch("off", torch.device("cuda"))


def test_auto_kernels_fuse_the_dual_bn_only_in_a_compiled_network():
    """Uncompiled on CUDA, the dual-BN op's Python launches made the H200's eager step 1.8x slower (docs/gpu.md):
    auto keeps the PGD step fused and leaves Split-BN's dual branch to aten; `on` fuses both anywhere."""
    from engine.perf import dual_kernel_wanted

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert dual_kernel_wanted("auto", cuda, compiled=True) and not dual_kernel_wanted("auto", cuda, compiled=False)
    assert dual_kernel_wanted("on", cpu, compiled=False) and dual_kernel_wanted("on", cuda, compiled=False)
    assert not dual_kernel_wanted("off", cuda, compiled=True) and not dual_kernel_wanted("auto", cpu, compiled=True)


def test_a_pgd_step_only_install_leaves_the_dual_branch_plain(tiny_cfg):
    from engine import kernels_bridge
    from engine.attacks import set_step_kernel
    from engine.models import set_dual_kernel

    run = build_run(apply_overrides(tiny_cfg, ["perf.kernels=off", "perf.cuda_graphs=off"]))
    model = run.nets.raw
    try:
        active, step = kernels_bridge.install(model, dual=False)
        assert active.endswith(" pgd_step only") and step is not None
        assert all(getattr(m, "dual_kernel", None) is None for m in model.modules()), "dual kernel installed"
        active, _ = kernels_bridge.install(model, dual=True)
        assert not active.endswith(" pgd_step only")
        assert any(getattr(m, "dual_kernel", None) is kernels_bridge.fused_dual_bn for m in model.modules())
    finally:
        set_step_kernel(None)
        set_dual_kernel(model, None)


def test_a_cuda_device_with_an_index_becomes_the_current_one(monkeypatch):
    """Triton launches from Python run on the current CUDA device, not their tensors': perf.device=cuda:1 in one
    process must make GPU 1 current (train and eval), and an index past the GPUs seen is refused in one line."""
    from engine.config import ConfigError
    from engine.perf import make_current, resolve_device

    made = []
    monkeypatch.setattr(torch.cuda, "set_device", made.append)
    make_current(torch.device("cuda", 1))
    make_current(torch.device("cuda"))  # no index: whatever is current (device 0, or torchrun's LOCAL_RANK)
    make_current(torch.device("cpu"))
    assert made == [torch.device("cuda", 1)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="sees 2 GPU.*cuda:0 to cuda:1"):
        resolve_device("cuda:2")


def test_datasheet_peaks_tell_the_h100_models_apart():
    from engine.perf import peak_tflops

    names = ["NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA A100-SXM4-80GB"]
    assert [peak_tflops(n) for n in names] == [989.0, 756.0, 835.0, 989.0, 312.0]
    assert peak_tflops("NVIDIA GeForce RTX 4090") is None
    # a MIG slice is a fraction of its GPU; an RTX A1000 is no A100; a GH200 is an H200's peak
    for name in (
        "NVIDIA A100-SXM4-40GB MIG 1g.5gb",
        "NVIDIA H100 80GB HBM3 MIG 1g.10gb",
        "NVIDIA RTX A1000 6GB Laptop GPU",
    ):
        assert peak_tflops(name) is None, name
    assert peak_tflops("NVIDIA A100 80GB PCIe") == 312.0 and peak_tflops("NVIDIA GH200 480GB") == 989.0


@pytest.mark.parametrize(
    "capability, built, runs",
    [
        ((7, 0), ["sm_75", "sm_80", "sm_90", "compute_90"], False),  # a V100 under a CUDA 13 wheel
        ((8, 6), ["sm_80", "sm_90"], True),  # sm_80's code runs on an sm_86
        ((9, 0), ["sm_80", "compute_80"], True),  # PTX, compiled for the newer GPU
        ((12, 0), ["sm_80", "sm_90"], False),
        ((9, 0), [], True),  # a build that does not say
        ((9, 0), ["sm_80", "sm_90a"], True),  # arch-specific code: that GPU only
        ((10, 0), ["sm_80", "sm_90", "sm_100a"], True),
        ((10, 3), ["sm_80", "sm_100a"], False),
        ((8, 7), ["sm_72", "sm_87"], True),  # a Jetson
    ],
)
def test_a_gpu_the_torch_build_has_no_code_for_is_refused_in_one_line(monkeypatch, capability, built, runs):
    """A V100 with a CUDA 13 wheel failed at its first kernel with CUDA's "no kernel image is available"."""
    from engine.config import ConfigError
    from engine.perf import make_current

    asked = []  # after set_device: torchrun's ranks ask their own GPU
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: asked.append(("set", device)))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: built)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Tesla V100-SXM2-16GB")
    if runs:
        make_current(torch.device("cuda", 1))
        assert asked == [("set", torch.device("cuda", 1)), torch.device("cuda", 1)]
    else:
        with pytest.raises(ConfigError, match=f"has no code for this GPU .*sm_{10 * capability[0] + capability[1]}"):
            make_current(torch.device("cuda"))


def test_bf16_set_on_a_gpu_without_it_is_said_and_idle_gpus_are_named(monkeypatch):
    """perf.dtype=bf16 on a T4 or V100 (emulated) warned on a CPU only; one process on a machine with several GPUs
    used one of them in silence."""
    from engine import distributed, perf
    from engine.distributed import DistInfo

    monkeypatch.setattr(perf, "cuda_has_native_bf16", lambda device: False)
    dtype, why = perf.resolve_dtype("bf16", torch.device("cuda"))
    assert dtype == torch.bfloat16 and "WARNING: this GPU emulates bf16" in why
    assert perf.resolve_dtype("auto", torch.device("cuda"))[0] == torch.float16
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    note = distributed.idle_gpus_note(DistInfo(), torch.device("cuda"))
    assert note and "4 GPUs visible" in note and "torchrun --nproc_per_node 4" in note
    assert distributed.idle_gpus_note(DistInfo(rank=0, world_size=4), torch.device("cuda", 0)) is None
    assert distributed.idle_gpus_note(DistInfo(), torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert distributed.idle_gpus_note(DistInfo(), torch.device("cuda")) is None


def test_a_chunk_below_the_memory_rule_says_so(monkeypatch):
    """On an 8 GB GPU a WRN-34-10's smallest chunk breaks the rule (3x its input-gradient peak within half the
    memory): the recorded reason said nothing of it."""
    import types

    from engine import evaluate
    from engine.config import EvalConfig

    monkeypatch.setattr(evaluate, "attack_bytes_per_image", lambda *a: 40 * 2**20)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(total_memory=8 * 2**30)
    )
    size, why = evaluate.resolve_chunk_size(EvalConfig(), None, (3, 32, 32), torch.device("cuda"))
    assert size == evaluate.CHUNK_CHOICES[-1] and "smallest chunk, above the rule" in why
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(total_memory=80 * 2**30)
    )
    assert "smallest" not in evaluate.resolve_chunk_size(EvalConfig(), None, (3, 32, 32), torch.device("cuda"))[1]


@pytest.mark.parametrize(
    "onednn, avx512_bf16, amx, native",
    [(True, True, False, True), (True, False, True, True), (True, False, False, False), (False, True, True, False)],
)
def test_native_bf16_needs_the_hardware_and_onednn(monkeypatch, onednn, avx512_bf16, amx, native):
    """oneDNN says bf16 on any AVX-512 CPU (Skylake to Ice Lake emulate it): the CPU's AVX512-BF16 or AMX flag must
    say so too; and a CPU limited by ONEDNN_MAX_CPU_ISA (oneDNN: no) stays fp32 whatever its flags."""
    from engine import perf

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert perf.cpu_has_native_bf16() is native


@pytest.mark.parametrize("change", ["momentum", "eps", "affine"])
def test_the_fused_dual_bn_takes_only_bns_it_computes_as_torch_would(monkeypatch, change):
    """The fused op takes one momentum and eps for both halves, and affine parameters: a pair that differs (the
    adversarial half ran with the clean BN's settings) or has none (a ValueError) takes the plain-torch path."""
    from torch import nn

    import kernels
    from engine import kernels_bridge

    clean, adv = nn.BatchNorm2d(3), nn.BatchNorm2d(3)
    x = torch.randn(8, 3, 4, 4)
    calls = []
    monkeypatch.setattr(kernels, "dual_batch_norm", lambda *a, **k: calls.append(k) or torch.zeros_like(x))
    kernels_bridge.fused_dual_bn(x, clean, adv, relu=False)
    assert len(calls) == 1  # an eligible pair takes the fused op
    if change == "affine":
        adv = nn.BatchNorm2d(3, affine=False)
    else:
        setattr(adv, change, 0.5)
    ref_clean, ref_adv = copy.deepcopy(clean), copy.deepcopy(adv)
    y = kernels_bridge.fused_dual_bn(x, clean, adv, relu=False)
    assert len(calls) == 1
    torch.testing.assert_close(y, torch.cat([ref_clean(x[:4]), ref_adv(x[4:])]))
    torch.testing.assert_close(adv.running_mean, ref_adv.running_mean)


def test_deterministic_pins_what_could_differ_between_processes(tiny_cfg, monkeypatch):
    """perf.deterministic (helper-85: on CUDA cuDNN's and Inductor's autotuning let a resumed process pick other
    kernels than the uninterrupted one): cuDNN deterministic and not timed, torch's deterministic algorithms,
    Inductor's deterministic mode, cuBLAS's fixed workspace; said in the start-up line; a step runs under it."""
    import os
    import warnings

    import torch._inductor.config as inductor

    from engine.config import ConfigError, PerfConfig
    from engine.train import train_epoch

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")  # restored as it was after the test
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    # Inductor's config through its own patch: monkeypatch's undo deleted the key (later reads raised). Its
    # deterministic mode exists from torch 2.10 (before it: nothing to pin, read here as off)
    mode = hasattr(inductor, "deterministic")

    def inductor_deterministic() -> bool:
        return getattr(inductor, "deterministic", False)

    with contextlib.ExitStack() as undo:
        if mode:
            undo.enter_context(inductor.patch(deterministic=False))
        undo.callback(torch.use_deterministic_algorithms, False)
        run = build_run(apply_overrides(tiny_cfg, ["perf.deterministic=true", "train.epochs=1"]))
        assert torch.are_deterministic_algorithms_enabled() and inductor_deterministic() == mode
        assert torch.backends.cudnn.deterministic and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert run.perf.summary().endswith(" deterministic")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train_epoch(run, 1)
        assert not [w for w in caught if "deterministic" in str(w.message)]  # every op of a step has a repeatable form
        plain = build_run(tiny_cfg)  # a later run in the process: not left deterministic (helper-154)
        assert not torch.are_deterministic_algorithms_enabled() and inductor_deterministic() is False
        run.perf.activate()  # a benchmark alternating runs: each run's activate() sets its own (helper-86)
        assert torch.are_deterministic_algorithms_enabled() and inductor_deterministic() == mode
        plain.perf.activate()
        assert not torch.are_deterministic_algorithms_enabled() and inductor_deterministic() is False
        run.perf.activate()
        assert torch.are_deterministic_algorithms_enabled() and inductor_deterministic() == mode
    assert not torch.are_deterministic_algorithms_enabled() and inductor_deterministic() is False
    assert not plain.perf.summary().endswith("deterministic")
    with pytest.raises(ConfigError, match="perf.cudnn_benchmark"):
        PerfConfig(deterministic=True, cudnn_benchmark="on")


def test_torchrun_processes_share_the_machine_s_compile_workers(monkeypatch):
    """Inductor starts up to min(32, cores) compile workers in every process: 8 processes on a 16-core machine
    started 128 at once. Each takes cores / N; an explicit TORCHINDUCTOR_COMPILE_THREADS decides; one process keeps
    Inductor's own choice."""
    import os

    import torch._inductor.config as inductor

    from engine.perf import share_compile_workers

    monkeypatch.setattr(os, "cpu_count", lambda: 128)  # the host's; this process may use 16 of them (a cpuset)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)  # (macOS has none)
    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS", raising=False)
    for local, threads, want in (("8", 16, 2), ("1", 32, 32), ("32", 16, 1)):  # one process: Inductor's 32 kept
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
        with inductor.patch(compile_threads=threads):
            share_compile_workers()
            assert inductor.compile_threads == want, local
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "12")
    with inductor.patch(compile_threads=12):
        share_compile_workers()
        assert inductor.compile_threads == 12
    # every compiled role shares them: the evaluation's too (`arat eval` under torchrun)
    from engine.config import PerfConfig
    from engine.perf import eval_network

    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS")
    with inductor.patch(compile_threads=16):
        eval_network(torch.nn.Linear(2, 2), PerfConfig(compile="on", compile_backend="eager"), torch.device("cpu"))
        assert inductor.compile_threads == 2


def test_compiling_is_refused_where_torch_compile_misses_a_mode_switch(monkeypatch, caplog):
    """Python 3.13.0 with torch 2.10 (CPython issue 125608): a compiled module switched from eval to train mode ran
    its eval graph (TRADES's and LBGAT's BN statistics went wrong, 2026-12-07). There perf.compile=on is refused in
    one line and auto turns compiling off, said once; elsewhere the probe does not run. The probe itself, run here
    as if on 3.13.0, sees this torch's switch."""
    import logging
    import types

    from engine import perf
    from engine.config import ConfigError, PerfConfig

    cuda = torch.device("cuda")
    monkeypatch.setattr(perf, "compile_misses_mode_switches", lambda: "compile misses mode switches here")
    with pytest.raises(ConfigError, match="compile misses mode switches here"):
        perf.compile_wanted(PerfConfig(compile="on"), torch.device("cpu"))
    perf._say_compile_off.cache_clear()
    caplog.set_level(logging.WARNING, logger="engine")
    assert perf.compile_wanted(PerfConfig(compile="auto"), cuda) is False
    assert perf.compile_wanted(PerfConfig(compile="auto"), cuda) is False
    said = [r.getMessage() for r in caplog.records if "compiling is off" in r.getMessage()]
    assert said == ["perf.compile=auto: compiling is off: compile misses mode switches here"]  # once
    assert perf.compile_wanted(PerfConfig(compile="off"), cuda) is False
    perf._say_compile_off.cache_clear()
    monkeypatch.undo()
    probe = perf.compile_misses_mode_switches
    probe.cache_clear()
    monkeypatch.setattr(perf, "sys", types.SimpleNamespace(version_info=(3, 13, 0, "final", 0)))
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # the probe compiles afresh (an earlier probe's graphs would be reused: no recompile)
    stats = counters["stats"]  # as a caller may hold it
    stats["unique_graphs"] += 7  # a caller's count so far, e.g. the GPU check's evaluation
    before = {key: dict(counter) for key, counter in counters.items()}
    try:  # a caller's recompile errors (tests/test_compile.py's) and cache limit (1: no second graph)
        with torch._dynamo.config.patch(error_on_recompile=True, cache_size_limit=1):
            assert probe() is None  # this torch sees the switch: the probe compiled, ran both modes, found the update
    finally:
        probe.cache_clear()
        stats["unique_graphs"] -= 7
    # its own graphs not counted as the caller's (on Python 3.13.0 the GPU check's evaluation read 4 graphs for 2)
    before["stats"]["unique_graphs"] -= 7
    assert {key: dict(counter) for key, counter in counters.items()} == before and counters["stats"] is stats
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    assert len(_debug_get_cache_entry_list(perf._ModeProbe.forward.__code__)) == 2  # both modes compiled, limit 1
    assert perf.compile_wanted(PerfConfig(compile="auto"), cuda) is True


@pytest.mark.parametrize(("backend", "threads", "compiles", "said"),
                         [("inductor", 1, True, True), ("inductor", 1, False, False), ("eager", 1, True, False),
                          ("inductor", 2, True, False)])  # fmt: skip
def test_the_start_up_line_says_any_thread_code_only_where_it_was_asked_for(monkeypatch, backend, threads,
                                                                            compiles, said):  # fmt: skip
    """ "(compiled C++ for any thread count)" was said for the eager/aot_eager backends (no C++) and would have been
    under torch 2.7 (none asked for): it now follows what inductor_options passed (helper-134)."""
    from engine import perf
    from engine.config import ModelConfig, PerfConfig
    from engine.models import build_model

    monkeypatch.setattr(perf, "dynamic_threads_compile", lambda: compiles)
    cfg = PerfConfig(device="cpu", dtype="fp32", compile="on", compile_backend=backend)
    with torch_threads(threads):
        _, _, switches = perf.apply(build_model(ModelConfig(width=8), 10), cfg)
        assert ("(compiled C++ for any thread count)" in switches.summary()) is said
