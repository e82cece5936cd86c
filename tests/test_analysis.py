import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.analysis import GradSim, backbone_weights
from engine.config import apply_overrides
from engine.train import run_training


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=True)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def direct(model, weights, loss_a, loss_b):
    """The gradient of each loss by its own backward, concatenated; cosine and sign-conflict ratio by hand."""
    flat = []
    for loss in (loss_a, loss_b):
        model.zero_grad()
        loss.backward(retain_graph=True)
        flat.append(torch.cat([w.grad.flatten().double() for w in weights]))
    a, b = flat
    return (a @ b / (a.norm() * b.norm())).item(), (a * b < 0).double().mean().item()


def test_backbone_weights_are_conv_and_linear_weights_only():
    model, teacher = Tiny(), Tiny().requires_grad_(False)
    weights = backbone_weights([model, teacher])  # no biases, no BN, no frozen teacher
    assert [id(w) for w in weights] == [id(model.conv.weight), id(model.fc.weight)]


def test_grad_sim_matches_a_direct_computation():
    torch.manual_seed(0)
    model, predictor = Tiny(), nn.Linear(3, 3)
    x, y = torch.rand(5, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1])
    logits = model(x)
    cls = 0.7 * F.cross_entropy(logits, y)
    inv = 3.0 * (1 - F.cosine_similarity(predictor(logits), model(x.flip(3)).detach(), dim=1)).mean()
    weights = backbone_weights([model])
    got = GradSim(weights)({"cls": cls, "inv": inv})
    cosine, conflict = direct(model, weights, cls, inv)
    assert abs(got["grad_sim"].item() - cosine) < 1e-5
    assert abs(got["grad_conflict"].item() - conflict) < 1e-6  # fp32 ratio of two counts
    assert -1 < cosine < 1 and 0 < conflict < 1


def test_under_ddp_grad_sim_is_the_cosine_of_the_gradients_averaged_over_the_ranks(monkeypatch):
    """helper-83: each rank's cosine of its own gradients, averaged, read lower than the synchronized gradients'
    (METHOD 5's figure: what one process over the whole batch measures). A stand-in all-reduce adds rank 1's."""
    import torch.distributed as dist

    from engine.distributed import DistInfo

    torch.manual_seed(0)
    model = Tiny()
    weights = backbone_weights([model])

    def terms(x, y):
        logits = model(x)
        return {"cls": F.cross_entropy(logits, y), "inv": logits.square().mean()}

    batches = [(torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])) for _ in range(2)]
    own = [
        [torch.autograd.grad(t[k], weights, retain_graph=True) for k in ("cls", "inv")]
        for t in (terms(x, y) for x, y in batches)
    ]
    rank1 = {k: torch.cat([g.reshape(-1) for g in own[1][i]]) for i, k in enumerate(("cls", "inv"))}
    sent = []

    def all_reduce(flat):  # the sum with rank 1's gradient of the same term (cls first, then inv)
        flat += rank1[("cls", "inv")[len(sent)]]
        sent.append(flat)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    got = GradSim(weights, DistInfo(rank=0, world_size=2))(terms(*batches[0]))
    mean = [torch.cat([(a + b).reshape(-1) / 2 for a, b in zip(own[0][i], own[1][i], strict=True)]) for i in (0, 1)]
    assert len(sent) == 2
    assert abs(got["grad_sim"].item() - F.cosine_similarity(mean[0], mean[1], dim=0).item()) < 1e-5


def test_grad_sim_needs_an_invariance_term_and_leaves_no_gradients():
    model = Tiny()
    loss = model(torch.rand(2, 3, 8, 8)).sum()
    assert GradSim(backbone_weights([model]))({"cls": loss}) == {}
    GradSim(backbone_weights([model]))({"cls": loss, "inv": loss.square()})
    assert all(p.grad is None for p in model.parameters())  # the step's own backward is unaffected


def test_grad_sim_is_logged_and_changes_nothing_else(tiny_cfg, tmp_path):
    cfg = apply_overrides(tiny_cfg, ["train.epochs=1", "data.synthetic_size=64", "eval.attacks=clean"])
    plain = run_training(cfg, tmp_path / "plain")
    analysed = run_training(apply_overrides(cfg, ["analysis.grad_sim=true"]), tmp_path / "analysed")
    row_plain, row = (json.loads((r / "metrics.jsonl").read_text()) for r in (plain, analysed))
    assert "grad_sim" not in row_plain and -1 <= row["grad_sim"] <= 1 and 0 <= row["grad_conflict"] <= 1
    assert row["loss"] == row_plain["loss"]
    a, b = (torch.load(r / "checkpoints" / "final.pt")["model"] for r in (plain, analysed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_under_fp16_the_terms_gradients_are_taken_scaled_and_an_overflow_counts_in_no_mean():
    """GradScaler's scale multiplies both terms before their gradients (tiny invariance gradients would underflow in
    fp16 and read as agreement); cosine and signs do not change under it. A step whose scaled gradients overflow
    (GradScaler skips it) gives zeros and grad_sim_steps 0: the epoch means divide by the finite steps."""
    from engine.distributed import DistInfo
    from engine.train import summarize

    torch.manual_seed(0)
    model = Tiny()
    x = torch.rand(4, 3, 8, 8)
    cls, inv = model(x).square().mean(), 1e-3 * model(x.flip(3)).mean()
    sim = GradSim(backbone_weights([model]))
    plain, scaled = sim({"cls": cls, "inv": inv}), sim({"cls": cls, "inv": inv}, scale=lambda t: t * 1024.0)
    torch.testing.assert_close(plain["grad_sim"], scaled["grad_sim"])
    assert plain["grad_conflict"] == scaled["grad_conflict"] and plain["grad_sim_steps"] == 1
    overflow = sim({"cls": cls, "inv": inv}, scale=lambda t: t * float("inf"))
    assert overflow["grad_sim_steps"] == 0 and overflow["grad_sim"] == 0 and overflow["grad_conflict"] == 0
    totals = {k: plain[k] + overflow[k] for k in plain} | {"loss": torch.tensor(6.0)}
    row = summarize(totals, 2, 8, DistInfo())
    assert row["loss"] == 3.0 and abs(row["grad_sim"] - round(plain["grad_sim"].item(), 5)) < 1e-9
    assert "grad_sim_steps" not in row


GRAD_SIM_STEP = """
import copy
import sys
import torch
from torch import nn
from engine.analysis import build_grad_sim
from engine.config import apply_overrides
from engine.recipes import get_recipe

grad_sim = sys.argv[1] == "on"
cfg = apply_overrides(get_recipe("smoke"), [f"analysis.grad_sim={str(grad_sim).lower()}", "perf.compile=on"])
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
eager = copy.deepcopy(net)
x = torch.randn(8, 32)
analysis = build_grad_sim(cfg, net, [])  # before the first compile, as build_run calls it
for name, model, forward in (("compiled", net, torch.compile(net, backend="inductor", dynamic=False)),
                             ("eager", eager, eager)):
    out = forward(x)  # saved intermediates: donated buffers of the compiled backward, unless grad-sim turned them off
    terms = {"cls": out.sin().sum(), "inv": out.square().mean()}
    if analysis:
        print(f"grad_sim_{name}", float(build_grad_sim(cfg, model, [])(terms)["grad_sim"]))
    (terms["cls"] + terms["inv"]).backward()
print("gap", max(float((a.grad - b.grad).abs().max()) for a, b in zip(net.parameters(), eager.parameters())))
"""


def test_grad_sim_is_right_where_inductor_s_cache_holds_the_graph_compiled_without_it(tmp_path):
    """An ablation recipe (grad-sim on) after `arat-...` (off) loads the same training graph from Inductor's on-disk
    cache, its backward compiled with donated buffers, which refuse grad-sim's retain_graph backward: the step
    raised at once (helper-83). With donated buffers turned off for grad-sim alone, the step then ran, and its
    gradients were silently wrong (5.8 at most against eager here): Inductor's graph cache does not key on donated
    buffers, so the cached backward still overwrote the saved tensors grad-sim's backward needs again. A grad-sim
    process now neither reads nor writes the caches: its gradients and cosines equal eager's."""
    import os
    import subprocess
    import sys

    # the cache switches of the environment left out: with the caches forced off the first run would fill none
    # (the test vacuous); forced on, they are what the fix must withstand (below)
    env = {k: v for k, v in os.environ.items() if "CACHE" not in k or not k.startswith(("TORCHINDUCTOR", "TORCH_"))}
    env |= {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "PYTHONPATH": os.getcwd()}
    outputs = []
    for grad_sim in ("off", "on"):  # the first fills the cache; the second would hit it
        done = subprocess.run([sys.executable, "-c", GRAD_SIM_STEP, grad_sim], env=env, capture_output=True, text=True,
                              timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stderr[-1500:]
        outputs.append(dict(line.split() for line in done.stdout.splitlines()))
        if grad_sim == "off":  # it filled the caches the grad-sim run would hit (else this test would prove nothing)
            root = tmp_path / "inductor"
            filled = [k for k in ("fxgraph", "aotautograd") if any(f.is_file() for f in root.glob(f"{k}/**/*"))]
            assert filled == ["fxgraph", "aotautograd"], sorted(p.name for p in root.iterdir())
    for out in outputs:
        assert float(out["gap"]) < 1e-5, outputs  # compiled gradients: eager's
    for out in outputs[1:]:
        assert float(out["grad_sim_compiled"]) == pytest.approx(float(out["grad_sim_eager"]), abs=1e-6), outputs
    # the caches' own switches forced on in the environment override the engine's (helper-114): still right
    forced = env | {"TORCHINDUCTOR_FX_GRAPH_CACHE": "1", "TORCHINDUCTOR_AUTOGRAD_CACHE": "1"}
    done = subprocess.run([sys.executable, "-c", GRAD_SIM_STEP, "on"], env=forced, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-1500:]
    assert float(dict(line.split() for line in done.stdout.splitlines())["gap"]) < 1e-5, done.stdout


def test_grad_sim_built_after_a_compile_in_the_same_process_is_right():
    """A grad-sim run built in a process that already compiled the same graphs with donated buffers (the benchmark's
    `--compare analysis.grad_sim=false,true`): dynamo does not guard on the switch, so the old backward was reused
    and overwrote what grad-sim's second backward reads. Its graphs are dropped: compiled equals eager."""
    import copy

    from engine.analysis import keep_saved_tensors

    torch._dynamo.reset()
    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))]
    nets += [copy.deepcopy(nets[0]) for _ in range(2)]
    x = torch.randn(8, 32)
    out = torch.compile(nets[0], backend="inductor", dynamic=False)(x)  # a run without grad-sim: donated buffers
    (out.sin().sum() + out.square().mean()).backward()
    keep_saved_tensors()  # what build_grad_sim calls
    cosines = []
    for net in nets[1:]:
        out = (torch.compile(net, backend="inductor", dynamic=False) if net is nets[1] else net)(x)
        terms = {"cls": out.sin().sum(), "inv": out.square().mean()}
        cosines.append(float(GradSim(backbone_weights([net]))(terms)["grad_sim"]))
        (terms["cls"] + terms["inv"]).backward()
    torch._dynamo.reset()
    assert cosines[0] == pytest.approx(cosines[1], abs=1e-6)
    for compiled, eager in zip(nets[1].parameters(), nets[2].parameters(), strict=True):
        torch.testing.assert_close(compiled.grad, eager.grad)
