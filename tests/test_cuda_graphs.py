"""Captured attacks (engine.attacks.graphs, issue 9 item 2).

On a CPU the bookkeeping runs with a stand-in capture: `Rerun` records nothing and replays by running the attack
again into the static output, with the generator and the network's buffers restored after "capturing", as a real
capture executes nothing. That checks keys, warm-up, static inputs and outputs, copies, the autocast cache switch
and the fallback; the CUDA capture itself is checked by the tests marked `cuda` (skipped without CUDA) and by the
GPU check.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.attacks import graphs, pgd
from engine.config import AttackConfig, ModelConfig, PerfConfig
from engine.models import build_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
REPO = Path(__file__).resolve().parents[1]


class Rerun:
    """CPU stand-in for CudaCapture (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, fail: bool = False, syncs: tuple[str, ...] = ()):
        self.device, self.model, self.fail, self.syncs = torch.device("cpu"), model, fail, syncs
        self.captured_cache_states: list[bool] = []

    def warm(self, fn):
        return fn()

    def still_capturing(self):
        return False

    def host_syncs(self, fn):
        return fn(), list(self.syncs)

    def capture(self, fn):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing\ndetails")
        saved = {k: v.clone() for k, v in self.model.state_dict().items()}
        hook = self.model.register_forward_pre_hook(
            lambda *_: self.captured_cache_states.append(torch.is_autocast_cache_enabled())
        )
        with torch.random.fork_rng():
            out = fn()
        hook.remove()
        self.model.load_state_dict(saved)
        return (lambda: out.copy_(fn())), out


def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(width=8), 10)


def batches(n: int, size: int = 6):
    gen = torch.Generator().manual_seed(1)
    return [(torch.rand(size, 3, 32, 32, generator=gen), torch.randint(0, 10, (size,), generator=gen))
            for _ in range(n)]  # fmt: skip


def attacks(model, data, cfg, installed, **kwargs):
    torch.manual_seed(5)
    with graphs.using(installed):
        return [pgd(model, x, y, cfg, **kwargs) for x, y in data]


@pytest.mark.parametrize("train", [True, False])
def test_captured_attacks_equal_eager_ones_call_by_call(train):
    """Five attacks on five batches: the same examples, and (train mode) the same running statistics, as eager; two
    warm-up calls, one capture, three replays; a returned example is not overwritten by the next replay."""
    cfg = AttackConfig(num_steps=3)
    model_a, model_b, data = net(), net(), batches(5)
    eager = attacks(model_a, data, cfg, None, bn="adv", train=train)
    captured = graphs.AttackGraphs(Rerun(model_b))
    torch.manual_seed(5)  # as `attacks` seeds
    with graphs.using(captured):
        replayed, kept = [], []
        for x, y in data:
            replayed.append(pgd(model_b, x, y, cfg, bn="adv", train=train))
            kept.append(replayed[-1].clone())  # as returned, before the next call
    assert (captured.captures, captured.replays) == (1, 3)
    assert captured.stats() == {"captures": 1, "replays": 3, "eager_calls": 0, "broken": False,
                                "attacks": 1, "uncapturable_attacks": 0}  # fmt: skip
    for a, b in zip(eager, replayed, strict=True):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(replayed, kept, strict=True))  # copies, not the static buffer
    for (x, y), (x0, y0) in zip(data, batches(5), strict=True):  # the callers' batches: copied in, never written
        assert torch.equal(x, x0) and torch.equal(y, y0)
    for (k, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_each_distinct_attack_gets_its_own_graph():
    """Branch, mode, shape, settings and a TRADES target each key their own capture; repeats replay."""
    model, cfg = net(), AttackConfig(num_steps=2)
    captured = graphs.AttackGraphs(Rerun(model), warmup=0)
    (x, y), (x4, y4) = batches(1)[0], batches(1, size=4)[0]
    target = torch.softmax(torch.randn(6, 10), dim=1)
    with graphs.using(captured):
        for _ in range(2):
            pgd(model, x, y, cfg, bn="adv", train=True)
            pgd(model, x, y, cfg, bn="clean", train=True)
            pgd(model, x, y, cfg, bn="adv", train=False)
            pgd(model, x4, y4, cfg, bn="adv", train=True)
            pgd(model, x, y, AttackConfig(num_steps=3), bn="adv", train=True)
            pgd(model, x, y, cfg, bn="adv", train=False, target_probs=target)
    assert (captured.captures, captured.replays) == (6, 12)


def test_a_trades_target_is_copied_into_the_graph():
    """The KL target is an input like x and y: a replay with a new target equals the eager attack on it."""
    cfg = AttackConfig(num_steps=3, start="gaussian")
    model_a, model_b, data = net(), net(), batches(4)
    targets = [torch.softmax(torch.randn(6, 10, generator=torch.Generator().manual_seed(i)), 1) for i in range(4)]
    cases = list(zip(data, targets, strict=True))
    torch.manual_seed(5)
    eager = [pgd(model_a, x, y, cfg, bn="adv", train=False, target_probs=t) for (x, y), t in cases]
    captured = graphs.AttackGraphs(Rerun(model_b), warmup=1)
    torch.manual_seed(5)
    with graphs.using(captured):
        graphed = [pgd(model_b, x, y, cfg, bn="adv", train=False, target_probs=t) for (x, y), t in cases]
    assert captured.replays == 3
    for a, b in zip(eager, graphed, strict=True):
        assert torch.equal(a, b)


def test_graphed_attacks_run_with_autocasts_weight_cache_off():
    """A weight cast cached during capture would live in the graph's pool (freed at capture end), and a compiled
    attack's guards include the cache switch (a guard failing inside the capture would recompile there): so every
    call of a graphed attack, warm-up included, runs with the cache off; an eager attack keeps it (issue 9 item 4)."""
    model, cfg = net(), AttackConfig(num_steps=2)
    stand_in = Rerun(model)
    seen = []
    hook = model.register_forward_pre_hook(lambda *_: seen.append(torch.is_autocast_cache_enabled()))
    x, y = batches(1)[0]
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    pgd(model, x, y, cfg, bn="adv", train=False, autocast=bf16)
    assert seen == [True, True]
    seen.clear()
    with graphs.using(graphs.AttackGraphs(stand_in, warmup=2)):
        for _ in range(4):
            pgd(model, x, y, cfg, bn="adv", train=False, autocast=bf16)
    hook.remove()
    assert stand_in.captured_cache_states == [False, False]
    assert len(seen) == 10 and not any(seen)  # two forwards in each of: two warm-up calls, the capture, two replays


def test_an_attack_that_syncs_with_the_host_is_never_captured(caplog):
    cfg = AttackConfig(num_steps=2)
    model_a, model_b, data = net(), net(), batches(4)
    eager = attacks(model_a, data, cfg, None, bn="adv", train=True)
    captured = graphs.AttackGraphs(Rerun(model_b, syncs=("called a synchronizing CUDA operation",)))
    with caplog.at_level(logging.WARNING, logger="engine"):
        checked = attacks(model_b, data, cfg, captured, bn="adv", train=True)
    assert (captured.captures, captured.replays) == (0, 0) and not captured.broken
    stats = captured.stats()  # two warm-up calls (the second found the sync), then two that ran uncaptured
    assert (stats["eager_calls"], stats["uncapturable_attacks"]) == (2, 1)
    assert [r.getMessage() for r in caplog.records] == [
        "an attack synchronizes with the host (called a synchronizing CUDA operation): it runs eagerly, uncaptured"
    ]
    for a, b in zip(eager, checked, strict=True):
        assert torch.equal(a, b)


def test_a_failed_capture_is_logged_once_and_every_attack_stays_eager(caplog):
    """After a failed capture the allocator's state is in doubt: no attack, of any key, is captured again."""
    cfg = AttackConfig(num_steps=2)
    model_a, model_b, data = net(), net(), batches(4)
    eager = attacks(model_a, data, cfg, None, bn="adv", train=True)
    eager += attacks(model_a, data, cfg, None, bn="clean", train=True)
    captured = graphs.AttackGraphs(Rerun(model_b, fail=True), warmup=1)
    with caplog.at_level(logging.WARNING, logger="engine"):
        fallback = attacks(model_b, data, cfg, captured, bn="adv", train=True)
        captured.capture_backend.fail = False
        fallback += attacks(model_b, data, cfg, captured, bn="clean", train=True)
    warnings = [r.getMessage() for r in caplog.records if "CUDA graph capture" in r.getMessage()]
    assert warnings == ["CUDA graph capture of an attack failed (operation not permitted when stream is capturing); "
                        "attacks run eagerly from now on"]  # fmt: skip
    assert (captured.captures, captured.replays) == (0, 0) and captured.broken
    # adv: one warm-up, the failed capture and two more; clean (a new key, after the failure): one warm-up, three
    assert captured.stats()["eager_calls"] == 6
    for a, b in zip(eager, fallback, strict=True):
        assert torch.equal(a, b)


def test_a_capture_out_of_memory_frees_its_tensors_before_the_eager_fallback():
    """The eager fallback ran inside the `except` block, while the error's traceback held the failed capture's
    frames and their tensors (allocated in its private pool): an out-of-memory capture's fallback ran short of just
    that memory. The fallback now runs after them, each freed."""
    import weakref

    kept = []

    class OutOfMemoryCapture(Rerun):
        def capture(self, fn):
            partial = torch.empty(1 << 16)  # what a capture allocated before running out
            kept.append(weakref.ref(partial))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        def warm(self, fn):
            if kept:  # the fallback after the failed capture
                assert kept[0]() is None, "the failed capture's tensors are still held"
            return fn()

    model = net()
    captured = graphs.AttackGraphs(OutOfMemoryCapture(model), warmup=1)
    attacks(model, batches(3), AttackConfig(num_steps=1), captured, bn="adv", train=True)
    assert kept and captured.broken and captured.stats()["eager_calls"] >= 1


def test_graphs_are_installed_for_cuda_only(tiny_cfg, monkeypatch):
    from engine import perf
    from engine.config import ConfigError, apply_overrides
    from engine.perf import attack_graphs
    from engine.train import build_run

    assert attack_graphs(PerfConfig(), torch.device("cpu")) is None
    assert attack_graphs(PerfConfig(cuda_graphs="off"), torch.device("cuda")) is None
    with pytest.raises(ConfigError, match="perf.cuda_graphs=on needs a CUDA device"):
        attack_graphs(PerfConfig(cuda_graphs="on"), torch.device("cpu"))
    # torch.compile's own CUDA graphs cannot nest inside ours: auto yields to them, on is refused
    own = PerfConfig(compile="on", compile_mode="reduce-overhead")
    assert attack_graphs(own, torch.device("cuda")) is None
    with pytest.raises(ConfigError, match="both capture CUDA graphs"):
        attack_graphs(PerfConfig(compile="on", compile_mode="max-autotune", cuda_graphs="on"), torch.device("cuda"))
    # only Inductor reads the mode: under the test backends ours are the only graphs (no CUDA here: a stand-in)
    monkeypatch.setattr(perf, "graphs_for_device", lambda device, reuse: "ours")
    test_backend = PerfConfig(compile="on", compile_mode="max-autotune", compile_backend="aot_eager", cuda_graphs="on")
    assert attack_graphs(test_backend, torch.device("cuda")) == "ours"
    monkeypatch.undo()
    run = build_run(apply_overrides(tiny_cfg, ["perf.device=cpu"]))
    assert graphs.active() is None and "cuda_graphs=False" in run.perf.summary()


def test_a_capture_that_fails_inside_reports_its_own_error(monkeypatch):
    """When the attack raises inside the capture, ending the capture fails too ("operation failed due to a previous
    error during capture"); the attack's own error is the one that goes on (and the pool is handed back)."""
    import contextlib

    ended, abandoned = [], []

    class Graph:
        def capture_begin(self, pool, capture_error_mode):
            pass

        def capture_end(self):
            ended.append(True)
            raise RuntimeError("operation failed due to a previous error during capture")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    capture = object.__new__(graphs.CudaCapture)
    capture.device, capture.stream, capture.pool = torch.device("cuda", 0), None, None
    monkeypatch.setattr(capture, "_abandon_capture", lambda: abandoned.append(True))

    def attack():
        raise ValueError("an op that cannot be captured")

    with pytest.raises(ValueError, match="an op that cannot be captured"):
        capture.capture(attack)
    with pytest.raises(RuntimeError, match="previous error during capture"):  # nothing raised before: its own
        capture.capture(lambda: torch.zeros(1))
    assert ended == [True, True] and abandoned == [True, True]


def test_only_torchs_sync_reports_count_as_host_syncs():
    """Turning the sync debug mode on warns once per process that the mode is a prototype: on the H200 that notice
    was taken for a sync, and the first attack of every run stayed uncaptured."""
    assert graphs.is_sync_warning("called a synchronizing CUDA operation")
    assert not graphs.is_sync_warning(
        "Synchronization debug mode is a prototype feature and does not yet detect all synchronizing operations "
        "(Triggered internally at /pytorch/torch/csrc/cuda/Module.cpp:1003.)"
    )


@cuda
def test_host_syncs_reports_a_sync_and_nothing_else_in_a_fresh_process():
    """In a new process (the mode's prototype notice comes once per process, at the first switch): a sync-free
    call reports nothing, one with .item() reports the sync."""
    code = (
        "import torch\n"
        "from engine.attacks.graphs import CudaCapture\n"
        "capture = CudaCapture(torch.device('cuda'))\n"
        "x = torch.ones(8, device='cuda')\n"
        "print(len(capture.host_syncs(lambda: x * 2)[1]), len(capture.host_syncs(lambda: x.sum().item())[1]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    quiet, synced = (int(n) for n in result.stdout.split()[-2:])
    assert quiet == 0 and synced >= 1, result.stdout + result.stderr[-2000:]


@cuda
@pytest.mark.parametrize("start", ["none", "uniform"])
def test_cuda_graph_replays_equal_eager_attacks(start):
    """On CUDA: captured attacks give the eager attacks' examples, bit for bit (deterministic cuDNN, conftest); with
    a random start this also checks that the graph-safe generator draws what eager draws from the same seed."""
    device = torch.device("cuda")
    cfg = AttackConfig(num_steps=3, start=start)
    model_a, model_b = net().to(device), net().to(device)
    data = [(x.to(device), y.to(device)) for x, y in batches(5, size=16)]
    eager = attacks(model_a, data, cfg, None, bn="adv", train=True)
    captured = graphs.for_device(device)
    replayed = attacks(model_b, data, cfg, captured, bn="adv", train=True)
    assert (captured.captures, captured.replays) == (1, 3)
    for a, b in zip(eager, replayed, strict=True):
        assert torch.equal(a, b)


@cuda
@pytest.mark.parametrize("switches", [["perf.dtype=fp32", "perf.kernels=off"], ["perf.dtype=bf16", "perf.kernels=on"]])
def test_cuda_captured_training_equals_eager_with_the_optimizer_between_replays(tiny_cfg, switches):
    """The optimizer updates the weights in place between replays: a replayed attack must read the new ones (a
    stale copy would drift from the first replay on). Six AR-AT steps on one batch, the attack captured at the third
    (bf16: autocast's cast cache off in the graph, on eagerly; Triton's fused PGD step inside the capture), give
    eager's losses and weights."""
    from engine.config import apply_overrides
    from engine.train import build_run, train_step

    losses, weights, counts = {}, {}, {}
    for graphed in ("off", "on"):
        run = build_run(apply_overrides(tiny_cfg, [*switches, "perf.device=cuda", f"perf.cuda_graphs={graphed}"]))
        x, y = next(iter(run.train_loader))
        torch.manual_seed(3)
        losses[graphed] = torch.tensor([float(train_step(run, x, y)["loss"]) for _ in range(6)])
        weights[graphed] = torch.cat([p.detach().float().flatten() for p in run.nets.raw.parameters()])
        counts[graphed] = run.perf.attack_graphs and (run.perf.attack_graphs.captures, run.perf.attack_graphs.replays)
    assert counts == {"off": None, "on": (1, 4)}
    torch.testing.assert_close(losses["on"], losses["off"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(weights["on"], weights["off"], rtol=1e-4, atol=1e-6)


@cuda
def test_after_a_failed_cuda_capture_eager_attacks_still_draw_random_starts(caplog):
    """A capture that cannot end (a device-wide synchronize inside it) must leave CUDA and its default generator
    usable: the attacks after it run eagerly, draw new random starts and stay in the eps-ball."""
    from engine.attacks.pgd import eager_pgd

    device = torch.device("cuda")
    model = net().to(device)
    x, y = (t.to(device) for t in batches(1, size=16)[0])
    cfg = AttackConfig(num_steps=2, start="uniform")
    captured = graphs.AttackGraphs(graphs.CudaCapture(device), warmup=1)

    def breaks_capture(*args, **kwargs):
        if torch.cuda.is_current_stream_capturing():
            torch.cuda.synchronize()  # not permitted while a stream captures: the capture is invalidated
        return eager_pgd(*args, **kwargs)

    with caplog.at_level(logging.WARNING, logger="engine"):
        outs = [captured.run(breaks_capture, model, x, y, cfg, bn="adv", train=False) for _ in range(4)]
    torch.cuda.synchronize()  # no error left behind
    assert captured.broken and captured.captures == 0 and captured.stats()["eager_calls"] == 3
    assert any("CUDA graph capture of an attack failed" in r.getMessage() for r in caplog.records)
    for out in outs:
        assert torch.isfinite(out).all() and (out - x).abs().max() <= cfg.eps + 1e-6
    assert not torch.equal(outs[2], outs[3])  # each eager call after the failure drew its own start
    assert torch.rand(4, device=device).isfinite().all()


def test_each_epoch_row_says_what_the_captured_attacks_did(tiny_cfg):
    """A capture that fails falls back to eager attacks with one warning: the epoch's metrics row and line say so
    too (captures, replays, attacks run uncaptured), so a run or the GPU check cannot read eager speed as graphed."""
    from engine.config import apply_overrides
    from engine.train import build_run, epoch_line, train_epoch

    # four steps, one warm-up: then a capture and three replays, or the failed capture and two more, eagerly
    for fail, expected in ((False, (1, 3, 0)), (True, (0, 0, 3))):
        run = build_run(apply_overrides(tiny_cfg, ["perf.device=cpu", "train.batch_size=64"]))
        run.perf.attack_graphs = graphs.AttackGraphs(Rerun(run.nets.raw, fail=fail), warmup=1)
        run.perf.activate()
        try:
            row = train_epoch(run, 1) | {"epoch": 1}
        finally:
            graphs.set_attack_graphs(None)
        assert tuple(row["cuda_graphs"][k] for k in ("captures", "replays", "eager_calls")) == expected
        assert ("attacks ran uncaptured" in epoch_line(row, 2)) == fail


def test_released_graphs_capture_again_and_keep_their_counts():
    """release() drops the captured attacks (memory back to the pool, for the evaluation after training): the next
    call warms up and captures anew, with the same result as eager, and the counts go on."""
    cfg = AttackConfig(num_steps=2)
    model_a, model_b, data = net(), net(), batches(4)
    eager = attacks(model_a, data, cfg, None, bn="adv", train=False)
    backend = Rerun(model_b)
    backend.pools = 0
    backend.new_pool = lambda: setattr(backend, "pools", backend.pools + 1)  # CudaCapture's: the next captures' pool
    captured = graphs.AttackGraphs(backend, warmup=1)
    first = attacks(model_b, data[:2], cfg, captured, bn="adv", train=False)
    captured.release()
    assert captured.stats()["attacks"] == 0 and (captured.captures, captured.replays) == (1, 1)
    assert backend.pools == 1  # a pool left without graphs is never captured into again
    torch.manual_seed(5)
    with graphs.using(captured):
        again = [pgd(model_b, x, y, cfg, bn="adv", train=False) for x, y in data[:2]]
    assert (captured.captures, captured.replays) == (2, 2)
    for a, b in zip(eager[:2], first, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)


def test_the_evaluation_ending_a_run_starts_without_training_state(tiny_cfg, tmp_path, monkeypatch):
    """Gradients, momentum and the training attacks' graphs are dropped before the final evaluation (checkpoints
    written first), so the evaluation's chunks meet the memory they were sized for."""
    from engine import train
    from engine.config import apply_overrides

    seen = {}

    def evaluate(model, *args, **kwargs):
        run = seen["run"]
        seen["grads"] = [p.grad for p in run.optimizer.param_groups[0]["params"] if p.grad is not None]
        seen["state"] = len(run.optimizer.state)
        seen["final"] = (tmp_path / "run" / "checkpoints" / "final.pt").is_file()
        seen["graphs"] = run.perf.attack_graphs.stats()["attacks"]
        return {}

    build = train.build_run

    def build_run(cfg, **kwargs):
        run = seen["run"] = build(cfg, **kwargs)
        run.perf.attack_graphs = graphs.AttackGraphs(Rerun(run.nets.raw), warmup=1)
        run.perf.activate()
        return run

    monkeypatch.setattr(train, "build_run", build_run)
    monkeypatch.setattr(train, "evaluate", evaluate)
    monkeypatch.setattr(train, "write_flags", lambda *a: None)
    cfg = apply_overrides(tiny_cfg, ["perf.device=cpu", "train.batch_size=64", "data.synthetic_size=256"])
    try:
        train.run_training(cfg, tmp_path / "run")
    finally:
        graphs.set_attack_graphs(None)
    assert seen["grads"] == [] and seen["state"] == 0 and seen["final"] and seen["graphs"] == 0
    assert seen["run"].perf.attack_graphs.captures == 1  # training did capture


def test_a_capture_left_open_by_a_failed_abandon_still_falls_back_eagerly(monkeypatch):
    """The fallback emptied the allocator's cache unconditionally: with a capture the abandon failed to end still
    open, empty_cache raises there, and the eager fallback was lost with it. Whether it is still open is asked on
    the capture's own stream (the caller's is not the one capturing)."""
    import contextlib

    emptied = []

    class LeftOpen(Rerun):
        def still_capturing(self):
            return True

    def empty_cache():
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "empty_cache", empty_cache)
    model = net()
    captured = graphs.AttackGraphs(LeftOpen(model, fail=True), warmup=1)
    out = attacks(model, batches(3), AttackConfig(num_steps=1), captured, bn="adv", train=True)
    assert len(out) == 3 and captured.broken and captured.stats()["eager_calls"] >= 1
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))  # closed: emptied as before
    again = graphs.AttackGraphs(Rerun(model, fail=True), warmup=1)
    attacks(model, batches(3), AttackConfig(num_steps=1), again, bn="adv", train=True)
    assert emptied == [True]
    # CudaCapture asks on its capture stream
    current = []

    @contextlib.contextmanager
    def on(stream):
        current.append(stream)
        yield
        current.pop()

    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: current[-1:] == ["capture stream"])
    backend = object.__new__(graphs.CudaCapture)
    backend.stream = "capture stream"
    assert backend.still_capturing() and not torch.cuda.is_current_stream_capturing()
