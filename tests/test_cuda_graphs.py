"""Captured attacks (engine.attacks.graphs, issue 9 item 2).

On a CPU the bookkeeping runs with a stand-in capture: `Rerun` records nothing and replays by running the attack
again into the static output, with the generator and the network's buffers restored after "capturing", as a real
capture executes nothing. That checks keys, warm-up, static inputs and outputs, copies, the autocast cache switch
and the fallback; the CUDA capture itself is checked by the tests marked `cuda` (skipped without CUDA) and by the
GPU check.
"""

from __future__ import annotations

import logging

import pytest
import torch

from engine.attacks import graphs, pgd
from engine.config import AttackConfig, ModelConfig, PerfConfig
from engine.models import build_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class Rerun:
    """CPU stand-in for CudaCapture (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, fail: bool = False):
        self.device, self.model, self.fail = torch.device("cpu"), model, fail
        self.captured_cache_states: list[bool] = []

    def warm(self, fn):
        return fn()

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
    replayed = attacks(model_b, data, cfg, captured, bn="adv", train=train)
    kept = replayed[2].clone()
    assert (captured.captures, captured.replays) == (1, 3)
    for a, b in zip(eager, replayed, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(replayed[2], kept)  # outputs are copies, not the graph's static buffer
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


def test_the_capture_runs_with_autocasts_weight_cache_off():
    """A weight cast cached during capture would live in the graph's pool (freed at capture end): off inside the
    capture only; the eager warm-up calls keep the cache (one cast per attack, issue 9 item 4)."""
    model, cfg = net(), AttackConfig(num_steps=2)
    stand_in = Rerun(model)
    captured = graphs.AttackGraphs(stand_in, warmup=1)
    seen_eager = []
    hook = model.register_forward_pre_hook(lambda *_: seen_eager.append(torch.is_autocast_cache_enabled()))
    x, y = batches(1)[0]
    with graphs.using(captured):
        for _ in range(3):
            pgd(model, x, y, cfg, bn="adv", train=False, autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    hook.remove()
    assert stand_in.captured_cache_states == [False, False]
    assert seen_eager[:2] == [True, True]  # the warm-up call's two forwards


def test_a_failed_capture_is_logged_once_and_the_attack_stays_eager(caplog):
    cfg = AttackConfig(num_steps=2)
    model_a, model_b, data = net(), net(), batches(4)
    eager = attacks(model_a, data, cfg, None, bn="adv", train=True)
    captured = graphs.AttackGraphs(Rerun(model_b, fail=True), warmup=1)
    with caplog.at_level(logging.WARNING, logger="engine"):
        fallback = attacks(model_b, data, cfg, captured, bn="adv", train=True)
    warnings = [r.getMessage() for r in caplog.records if "CUDA graph capture" in r.getMessage()]
    assert warnings == ["CUDA graph capture of an attack failed (operation not permitted when stream is capturing); "
                        "this attack runs eagerly"]  # fmt: skip
    assert (captured.captures, captured.replays) == (0, 0)
    for a, b in zip(eager, fallback, strict=True):
        assert torch.equal(a, b)


def test_graphs_are_installed_for_cuda_only(tiny_cfg):
    from engine.config import ConfigError, apply_overrides
    from engine.perf import attack_graphs
    from engine.train import build_run

    assert attack_graphs(PerfConfig(), torch.device("cpu")) is None
    assert attack_graphs(PerfConfig(cuda_graphs="off"), torch.device("cuda")) is None
    with pytest.raises(ConfigError, match="perf.cuda_graphs=on needs a CUDA device"):
        attack_graphs(PerfConfig(cuda_graphs="on"), torch.device("cpu"))
    run = build_run(apply_overrides(tiny_cfg, ["perf.device=cpu"]))
    assert graphs.active() is None and "cuda_graphs=False" in run.perf.summary()


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
