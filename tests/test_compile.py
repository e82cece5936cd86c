"""torch.compile per role: after a warm-up epoch, no recompiles and no graph breaks, and results equal to eager's, for
every method family.

Dynamo's recompiles and graph breaks do not depend on the backend, so these tests compile with backend "eager"
(the captured graphs run as traced, seconds per case); with it a compiled run also equals the eager one exactly.
The Inductor backend's numbers are checked by tests/test_perf.py::test_compile_equals_eager (slow).
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from engine.config import apply_overrides
from engine.evaluate import evaluate
from engine.recipes import get_recipe
from engine.train import build_run, final_model, train_epoch

SHAPE = [
    "data.dataset=synthetic",
    "data.synthetic_size=128",
    "model.width=8",
    "train.epochs=2",  # a warm-up epoch, then the epoch checked
    "train.batch_size=32",
    "train.log_every=2",
    "attack.num_steps=2",
    "method.balance_images=64",
    "eval.attacks=clean,pgd20",
    "eval.num_examples=40",  # a short last batch of 8: padded to 32, no second graph
    "eval.batch_size=32",
    "perf.compile_backend=eager",
    "perf.device=cpu",
    "perf.dtype=fp32",
    "perf.cudnn_benchmark=off",
]
ARREST = ["method.pretrain_epochs=1", "method.finetune_milestones=1", "train.epochs=3"]  # + a fine-tuning warm-up
FAMILIES = {
    "arat": ("arat-resnet18-cifar10", []),
    "at": ("at-resnet18-cifar10", []),
    "trades": ("trades-resnet18-cifar10", []),
    "mart": ("mart-resnet18-cifar10", []),
    "lbgat": ("lbgat-resnet18-cifar10", []),
    "arrest": ("arrest-resnet18-cifar10", ARREST),
    "std": ("std-resnet18-cifar10", []),
    "ablation-v0": ("ablation-v0-resnet18-cifar10", []),
    "ablation-stopgrad": ("ablation-stopgrad-resnet18-cifar10", []),
    "ablation-splitbn": ("ablation-splitbn-resnet18-cifar10", []),
    "swa": ("arat-swa-resnet18-cifar10", ["swa.start_epoch=2", "swa.every=1"]),
    "grad-sim": ("arat-resnet18-cifar10", ["analysis.grad_sim=true"]),
    "bf16-kernels": ("arat-resnet18-cifar10", ["perf.dtype=bf16", "perf.kernels=on"]),
    "gemm-conv": ("arat-resnet18-cifar10", ["perf.gemm_conv=4"]),
}


def train_and_evaluate(cfg, on_warm=None):
    """Epochs 1..epochs-1 (the warm-up: ARREST's first fine-tuning epoch included), `on_warm()`, the last epoch
    and two evaluations (clean + PGD-20 with a padded last batch). Returns the last epoch's row and the results."""
    run = build_run(cfg)
    for epoch in range(1, cfg.epochs):
        train_epoch(run, epoch)
    if on_warm:
        on_warm()
    row = train_epoch(run, cfg.epochs)
    model = final_model(run)  # SWA: the average, its BN statistics re-estimated
    results = [evaluate(model, run.test_split, cfg.eval, run.perf.device, cfg.seed, cfg.perf) for _ in range(2)]
    accuracies = [{name: r["accuracy"] for name, r in result.items()} for result in results]
    return {k: v for k, v in row.items() if k not in ("epoch_seconds", "images_per_s", "tflop_per_s")}, accuracies


@pytest.fixture
def dynamo_fresh():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.config.error_on_recompile = False
    torch._dynamo.reset()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_no_recompile_or_graph_break_after_warmup(family, dynamo_fresh):
    recipe, extra = FAMILIES[family]
    cfg = apply_overrides(get_recipe(recipe), SHAPE + extra + ["perf.compile=on"])
    warm = {}

    def after_warmup():
        warm["graphs"] = counters["stats"]["unique_graphs"]
        # a recompile now fails the test (dynamo_fresh turns it off again: monkeypatch's undo deletes a key of
        # torch's config modules, which then raise on every read)
        torch._dynamo.config.error_on_recompile = True

    row, results = train_and_evaluate(cfg, after_warmup)
    assert warm["graphs"] > 0, "nothing was compiled"
    assert row.pop("compile") == {"graphs": 0, "graph_breaks": 0, "eager_frames": 0}  # the epoch's, as metrics has it
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    eval_graphs = counters["stats"]["unique_graphs"] - warm["graphs"]
    assert eval_graphs == 2, f"{eval_graphs} graphs after warm-up: evaluation should add its two roles' graphs"
    torch._dynamo.reset()
    eager_row, eager_results = train_and_evaluate(apply_overrides(cfg, ["perf.compile=off"]))
    assert row == eager_row and results == eager_results  # backend "eager" runs the traced ops as they are


@pytest.mark.parametrize("family", ["lbgat", "arrest"])
def test_a_methods_second_network_follows_the_runs_switches(family, dynamo_fresh):
    """Issue 9 item 5: LBGAT's clean model and ARREST's teacher run channels-last and compiled (a role of their
    own, sharing the module's weights) when the model does, and as themselves when it does not. The compiled
    families above would pass with `follow` a no-op: the main model's graphs alone count as compiled."""
    from torch._dynamo.eval_frame import OptimizedModule

    from engine.perf import AuxForward

    recipe, extra = FAMILIES[family]
    name = {"lbgat": "clean_model", "arrest": "teacher"}[family]
    for compiled in (True, False):
        switches = [f"perf.compile={'on' if compiled else 'off'}", "perf.channels_last=true"]
        run = build_run(apply_overrides(get_recipe(recipe), SHAPE + extra + switches))
        net, runner = getattr(run.method, name), run.method.runner(name)
        convs = [m.weight for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
        assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
        if compiled:
            assert isinstance(runner, OptimizedModule) and isinstance(runner._orig_mod, AuxForward)
            assert runner._orig_mod.net is net
        else:
            assert runner is net


def test_each_epoch_row_counts_the_graphs_it_built(dynamo_fresh):
    """Issue 9's recompile figure in every compiled run's metrics: the first epoch builds the graphs (its line says
    how many), a later one builds none; an eager run has no such figure."""
    from engine.train import epoch_line

    cfg = apply_overrides(get_recipe("arat-resnet18-cifar10"), SHAPE + ["perf.compile=on"])
    run = build_run(cfg)
    first, second = train_epoch(run, 1), train_epoch(run, 2)
    assert first["compile"]["graphs"] > 0 and first["compile"]["graph_breaks"] == first["compile"]["eager_frames"] == 0
    assert second["compile"] == {"graphs": 0, "graph_breaks": 0, "eager_frames": 0}
    assert f"({first['compile']['graphs']} graphs compiled, 0 graph breaks)" in epoch_line(first | {"epoch": 1}, 2)
    assert "compiled" not in epoch_line(second | {"epoch": 2}, 2)
    one = {"epoch": 2, "compile": {"graphs": 1, "graph_breaks": 0}}
    assert "(1 graph compiled, 0 graph breaks)" in epoch_line(second | one, 2)
    eager = build_run(apply_overrides(cfg, ["perf.compile=off"]))
    assert "compile" not in train_epoch(eager, 1)


def test_a_function_dynamo_gives_up_on_is_counted_and_named(dynamo_fresh):
    """Past its recompile limit dynamo runs a function eagerly from then on, building no graph and breaking none:
    graphs and breaks alone would read "no recompile" for an epoch that ran uncompiled."""
    from engine.perf import dynamo_counts
    from engine.train import epoch_line

    double = torch.compile(lambda x: x * 2, dynamic=False, backend="eager")
    with torch._dynamo.config.patch(cache_size_limit=2):  # not monkeypatch: its undo deletes the config's key
        for n in range(4):
            double(torch.ones(n + 1))  # a new shape each call: two graphs, then the limit
    assert dynamo_counts() == {"graphs": 2, "graph_breaks": 0, "eager_frames": 1}
    given_up = {"graphs": 0, "graph_breaks": 0, "eager_frames": 1}
    row = {"epoch": 2, "images_per_s": 9.0, "epoch_seconds": 1.0, "compile": given_up}
    assert "(1 function left uncompiled by dynamo: TORCH_LOGS=recompiles says why)" in epoch_line(row, 2)
    assert "uncompiled" not in epoch_line(row | {"compile": {"graphs": 0, "graph_breaks": 0}}, 2)  # older rows


def test_compile_auto_is_on_for_cuda_only():
    from engine.config import PerfConfig
    from engine.perf import compile_wanted

    assert PerfConfig().compile == "auto"
    assert compile_wanted(PerfConfig(), torch.device("cuda")) and not compile_wanted(PerfConfig(), torch.device("cpu"))
    assert compile_wanted(PerfConfig(compile="on"), torch.device("cpu"))


def test_roles_share_weights_and_mode():
    from engine.config import ModelConfig, PerfConfig
    from engine.models import build_model
    from engine.perf import AttackForward, TrainForward, role

    model = build_model(ModelConfig(width=8), 10)
    cfg = PerfConfig(compile="on", compile_backend="eager")
    train, attack = (role(kind, model, cfg, torch.device("cpu")) for kind in (TrainForward, AttackForward))
    assert (
        {id(p) for p in train.parameters()}
        == {id(p) for p in model.parameters()}
        == {id(p) for p in attack.parameters()}
    )
    model.eval()
    assert not train.training and not attack.training
    attack.train()
    assert model.training and train.training
