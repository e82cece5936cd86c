"""ARREST: the frozen teacher, the two stages, the noisy-replay switch, --init from existing checkpoints."""

import copy
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from method_cases import method_case

from engine.attacks import random_start
from engine.cli import main
from engine.config import ConfigError, apply_overrides
from engine.methods.arrest import init_overrides, read_init_state, replay_switch
from engine.perf import Perf
from engine.recipes import get_recipe

NO_AMP = Perf(torch.device("cpu"), torch.float32, False, False, "off").autocast
COS_30 = math.cos(math.radians(30))


def setup(tiny_cfg, *overrides):
    return method_case(tiny_cfg, "arrest", *overrides)


def at_angle(degrees: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher features (3, 2) at `degrees` from each other, in every row."""
    t = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
    a = math.radians(degrees)
    rot = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return t @ rot.T, t


@pytest.mark.parametrize("degrees, fires", [(0, False), (29.9, False), (30.1, True), (90, True)])
def test_replay_switch_fires_exactly_below_cos_30(degrees, fires):
    student, teacher = at_angle(degrees)
    assert bool(replay_switch(student, teacher, COS_30)) is fires


def test_replay_switch_uses_the_batch_mean():
    s1, t1 = at_angle(10)  # cos 0.985
    s2, t2 = at_angle(50)  # cos 0.643; mean 0.814 < cos 30
    assert bool(replay_switch(torch.cat([s1, s2]), torch.cat([t1, t2]), COS_30))
    assert not bool(replay_switch(torch.cat([s1, s1, s2]), torch.cat([t1, t1, t2]), COS_30))  # mean 0.871


def two_ranks(monkeypatch, other: dict[int, torch.Tensor] | torch.Tensor):
    """This process as rank 0 of 2, whose all-reduce adds rank 1's values (`other`: by the tensor's shape or one)."""
    import torch.distributed as dist

    from engine.distributed import DistInfo
    from engine.methods import arrest

    monkeypatch.setattr(arrest, "group_info", lambda: DistInfo(rank=0, world_size=2))

    def all_reduce(t):
        t += other if isinstance(other, torch.Tensor) else other[t.numel()]

    monkeypatch.setattr(dist, "all_reduce", all_reduce)


def test_replay_switch_under_ddp_takes_every_rank_s_batch(monkeypatch):
    """Under DDP each rank decided on its own share of the batch: rank 0 replayed noise while rank 1 attacked, and
    the averaged gradient mixed the two. The ranks' mean cosine decides for all, as one process would."""
    student, teacher = at_angle(40)  # cos 0.766 here: below cos 30 alone
    assert bool(replay_switch(student, teacher, COS_30))
    two_ranks(monkeypatch, torch.tensor([0.99]))  # rank 1's mean cosine: 0.878 over both, above cos 30
    assert not bool(replay_switch(student, teacher, COS_30))


def test_under_ddp_the_teacher_takes_the_ranks_average_bn_statistics(tiny_cfg, monkeypatch):
    """The teacher snapshot at the start of fine-tuning: each rank's BN statistics are its own under DDP, so each
    rank distilled towards its own teacher; they take the ranks' average (its weights are the same everywhere)."""
    _, model, method, nets = setup(tiny_cfg, "train.epochs=2", "method.pretrain_epochs=1")
    method.on_epoch_start(nets, [], NO_AMP, 1)
    two_ranks(monkeypatch, torch.ones(()))  # rank 1's statistics: 1 everywhere (mean 1 and variance 1)
    weight = model.conv1.weight.clone()
    method.on_epoch_start(nets, [], NO_AMP, 2)
    assert torch.equal(method.teacher.bn1.running_mean, (model.bn1.running_mean + 1) / 2)
    assert torch.equal(method.teacher.bn1.running_var, (model.bn1.running_var + 1) / 2)
    assert torch.equal(method.teacher.conv1.weight, weight)


def test_replay_window_is_the_first_half_of_fine_tuning(tiny_cfg):
    _, model, method, nets = setup(tiny_cfg, "method.pretrain_epochs=2", "train.epochs=6")
    window = []
    for epoch in range(1, 7):
        method.on_epoch_start(nets, [], NO_AMP, epoch)
        window.append(method.replay_window())
    assert window == [False, False, True, True, False, False]  # 4 fine-tuning epochs: the first 2


def fine_tune_step(tiny_cfg, replay_cos: float, epoch: int, steps: int = 0):
    """One fine-tuning step with a deterministic attack (no random start; x~ = x unless replay with 0 steps), the
    student moved off the teacher."""
    overrides = [f"method.replay_cos={replay_cos}", f"attack.num_steps={steps}", "attack.start=none", "train.epochs=4"]
    cfg, model, method, nets = setup(tiny_cfg, *overrides)
    method.on_epoch_start(nets, [], NO_AMP, 1)  # teacher = student
    with torch.no_grad():
        model.linear.weight.add_(0.5 * torch.randn_like(model.linear.weight))
        model.layer4[1].conv2.weight.mul_(-1)  # penultimate features now differ from the teacher's
    method.on_epoch_start(nets, [], NO_AMP, epoch)
    ref, teacher = copy.deepcopy(model), copy.deepcopy(method.teacher)
    x, y = torch.rand(6, 3, 32, 32), torch.randint(0, 10, (6,))
    torch.manual_seed(3)
    out = method.step(nets, x, y, NO_AMP)
    torch.manual_seed(3)
    noisy = random_start(x, cfg.attack.eps, "uniform")
    return cfg, out, ref, teacher, x, noisy, y


def by_hand(cfg, ref, teacher, x_in, x, y):
    with torch.no_grad():
        teacher(x)
        h_t = teacher.last_pre_linear
    logits = ref(x_in)
    h = ref.last_pre_linear
    inv = cfg.method.invariance_weight * (1 - F.cosine_similarity(h_t, h, dim=1)).mean()
    return F.cross_entropy(logits, y), inv


@pytest.fixture
def capture_penultimate(monkeypatch):
    """Record the classifier's input on every ResNet-18 forward (as `last_pre_linear`)."""
    from engine.models.resnet import ResNet18

    original = ResNet18.forward

    def forward(self, x, bn="adv", features=False):
        self.last_pre_linear = None
        handle = self.linear.register_forward_pre_hook(lambda m, a: setattr(self, "last_pre_linear", a[0]))
        try:
            return original(self, x, bn, features)
        finally:
            handle.remove()

    monkeypatch.setattr(ResNet18, "forward", forward)


def test_replay_fires_in_the_first_half(tiny_cfg, capture_penultimate):
    cfg, out, ref, teacher, x, noisy, y = fine_tune_step(tiny_cfg, replay_cos=1.0, epoch=2)  # 2 of 4: in the window
    assert out.sums["replay"].item() == 1
    cls, inv = by_hand(cfg, ref, teacher, noisy, x, y)  # x~ = x + U(-eps, eps)
    torch.testing.assert_close(out.terms["cls"], cls, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.terms["inv"], inv, rtol=1e-4, atol=1e-5)


def test_no_replay_above_the_threshold(tiny_cfg, capture_penultimate):
    cfg, out, ref, teacher, x, _, y = fine_tune_step(tiny_cfg, replay_cos=-1.0, epoch=2)
    assert out.sums["replay"].item() == 0
    cls, inv = by_hand(cfg, ref, teacher, x, x, y)  # x~ = the attack's output (here x itself: 0 steps, no start)
    torch.testing.assert_close(out.terms["cls"], cls, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.terms["inv"], inv, rtol=1e-4, atol=1e-5)


def test_without_replay_the_student_trains_on_its_eval_mode_pgd_example(tiny_cfg, capture_penultimate):
    """With attack steps: x~ is PGD on the student in eval mode (the running statistics), not x and not a train-mode
    attack (both would pass the 0-step tests above)."""
    from engine.attacks import pgd

    cfg, out, ref, teacher, x, _, y = fine_tune_step(tiny_cfg, replay_cos=-1.0, epoch=2, steps=2)
    assert out.sums["replay"].item() == 0
    twin = copy.deepcopy(ref)  # before a forward leaves a captured feature (no deepcopy of a non-leaf) on it
    x_adv = pgd(ref, x, y, cfg.attack, bn="adv", train=False)
    assert (x_adv != x).any() and not torch.equal(x_adv, pgd(twin, x, y, cfg.attack, bn="adv", train=True))
    cls, inv = by_hand(cfg, ref, teacher, x_adv, x, y)
    torch.testing.assert_close(out.terms["cls"], cls, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.terms["inv"], inv, rtol=1e-4, atol=1e-5)


def test_replay_compares_the_student_s_eval_mode_clean_features_with_the_teacher_s(tiny_cfg, capture_penultimate):
    """The switch reads the batch's mean cosine between the student's clean penultimate features in eval mode and
    the teacher's: thresholds just above and below that cosine turn it on and off (thresholds of +-1 could not
    tell it from the train-mode features', which lie outside that margin here)."""
    _, _, ref, teacher, x, _, _ = fine_tune_step(tiny_cfg, replay_cos=-1.0, epoch=2)
    twin = copy.deepcopy(ref)
    with torch.no_grad():
        teacher(x)
        h_t = teacher.last_pre_linear
        ref.eval()
        ref(x)
        c = F.cosine_similarity(ref.last_pre_linear, h_t, dim=1).mean().item()
        twin.train()
        twin(x)
        c_train = F.cosine_similarity(twin.last_pre_linear, h_t, dim=1).mean().item()
    assert abs(c_train - c) > 1e-2 and -1 < c < 1
    for threshold, fires in ((c + 1e-3, 1), (c - 1e-3, 0)):
        assert fine_tune_step(tiny_cfg, replay_cos=threshold, epoch=2)[1].sums["replay"].item() == fires


def test_no_replay_in_the_second_half(tiny_cfg, capture_penultimate):
    cfg, out, ref, teacher, x, _, y = fine_tune_step(tiny_cfg, replay_cos=1.0, epoch=3)  # 3 of 4: past the half
    assert out.sums["replay"].item() == 0
    cls, _ = by_hand(cfg, ref, teacher, x, x, y)
    torch.testing.assert_close(out.terms["cls"], cls, rtol=1e-4, atol=1e-5)


def test_teacher_is_frozen_saved_and_in_eval_mode(tiny_cfg):
    _, model, method, nets = setup(tiny_cfg, "train.epochs=2")
    method.on_epoch_start(nets, [], NO_AMP, 1)
    assert all(not p.requires_grad for p in method.teacher.parameters())
    assert any(k.startswith("teacher.") for k in method.state_dict()) and method.teacher_ready.item()
    method.train()
    assert not method.teacher.training  # its BN keeps the pretrained statistics
    before = copy.deepcopy(method.teacher.state_dict())
    out = method.step(nets, torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,)), NO_AMP)
    out.loss.backward()
    assert all(p.grad is None for p in method.teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in method.teacher.state_dict().items())
    assert model.linear.weight.grad.abs().max() > 0


def test_two_stages_and_their_lr(tiny_cfg):
    overrides = ["method.pretrain_epochs=2", "train.epochs=6", "method.finetune_lr=0.025"]
    _, model, method, nets = setup(tiny_cfg, *overrides, "method.finetune_milestones=2,3", "optim.milestones=1")
    assert [method.lr_at(e) for e in range(1, 7)] == pytest.approx([0.02, 0.005, 0.025, 0.025, 0.0025, 0.00025])
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    method.on_epoch_start(nets, [], NO_AMP, 2)
    assert not method.teacher_ready.item() and set(method.step(nets, x, y, NO_AMP).terms) == {"cls"}
    method.on_epoch_start(nets, [], NO_AMP, 3)  # fine-tuning starts: the teacher is the current network
    assert method.teacher_ready.item()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in method.teacher.state_dict().items())
    assert set(method.step(nets, x, y, NO_AMP).terms) == {"cls", "inv"}


def test_init_needs_the_standard_stage_dropped(tiny_cfg):
    with pytest.raises(ConfigError, match="pretrain_epochs=0"):
        apply_overrides(get_recipe("arrest-resnet18-cifar10"), ["method.init=x.pt"])
    cfg = get_recipe("arrest-resnet18-cifar10")
    resolved = Path("x.pt").resolve()
    assert init_overrides(cfg, "x.pt") == [f"method.init={resolved}", "method.pretrain_epochs=0", "train.epochs=20"]
    with pytest.raises(ConfigError, match="ARREST"):
        init_overrides(get_recipe("at-resnet18-cifar10"), "x.pt")


def test_fine_tuning_with_neither_a_standard_stage_nor_an_init_is_refused(tiny_cfg):
    """helper-83: method.pretrain_epochs=0 without method.init fine-tuned against the untrained network as teacher
    (its features' cosine 1: the replay never fired), without a word. A resumed --init run still builds (test
    above: the resume passes the run its init as "", and the check reads the config first)."""
    from engine.train import build_run

    cfg = apply_overrides(tiny_cfg, ["method.name=arrest", "model.split_bn=false", "method.pretrain_epochs=0"])
    with pytest.raises(ConfigError, match="--init PATH"):
        build_run(cfg)


def test_init_from_pyautoattack_standard_resnet18(tiny_cfg):
    pyautoattack = pytest.importorskip("pyautoattack")
    path = os.path.join(os.path.dirname(pyautoattack.__file__), "examples", "model_test.pt")
    if not os.path.exists(path):
        pytest.skip("pyautoattack ships no examples/model_test.pt here")
    cfg, model, method, _ = setup(tiny_cfg, "model.width=64", f"method.init={path}", "method.pretrain_epochs=0")
    plain = read_init_state(path)
    assert torch.equal(model.conv1.weight, plain["conv1.weight"].float())
    assert torch.equal(method.teacher.linear.weight, plain["linear.weight"].float()) and method.teacher_ready.item()


def test_cli_init_fine_tunes_a_standard_run(tiny_cfg, tmp_path, capsys):
    small = ["data.dataset=synthetic", "data.synthetic_size=64", "model.width=8", "train.batch_size=32"]
    small += ["attack.num_steps=1", "eval.attacks=clean", "eval.num_examples=64", "method.balance_images=32"]
    small += ["perf.dtype=fp32"]
    args = [f"--set={s}" for s in [*small, "train.epochs=1"]]
    assert main(["train", "--recipe", "std-resnet18-cifar10", "--out", str(tmp_path / "std"), *args]) == 0
    init = ["--init", str(tmp_path / "std")]
    replay = ["--set", "method.replay_until=1"]  # epoch 1 replays under 1 and 2 epochs alike: the resume trains on
    code = main(["train", "--recipe", "arrest-resnet18-cifar10", *init, "--out", str(tmp_path / "ft"), *args, *replay])
    assert code == 0, capsys.readouterr().err
    std = torch.load(tmp_path / "std" / "checkpoints" / "final.pt")["model"]
    ft = torch.load(tmp_path / "ft" / "checkpoints" / "final.pt")
    teacher = torch.load(tmp_path / "ft" / "checkpoints" / "latest.pt")["method"]  # (final.pt leaves it out)
    assert all(torch.equal(teacher[f"teacher.{k}"], v) for k, v in std.items())  # the teacher: the init
    assert not any(k.startswith("teacher.") for k in ft["method"])
    assert not torch.equal(ft["model"]["linear.weight"], std["linear.weight"])  # the student moved
    cfg = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert cfg["method"]["init"] == str(tmp_path / "std") and cfg["method"]["pretrain_epochs"] == 0
    # trained on after the initial network moved: the checkpoint holds the student and the teacher, so the init
    # file is not read again (the resume stopped on the missing file)
    (tmp_path / "std").rename(tmp_path / "std-moved")
    (tmp_path / "ft" / "config.json").write_text(json.dumps(cfg | {"epochs": 2}))
    assert main(["train", "--resume", str(tmp_path / "ft"), "--no-eval"]) == 0, capsys.readouterr().err
    again = torch.load(tmp_path / "ft" / "checkpoints" / "latest.pt")
    assert again["epoch"] == 2 and all(torch.equal(again["method"][f"teacher.{k}"], v) for k, v in std.items())
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["method"]["init"] == str(tmp_path / "std")


def test_resume_across_the_stage_boundary(tiny_cfg, tmp_path):
    from engine.train import load_run_config, run_training

    small = ["data.synthetic_size=64", "eval.attacks=clean", "perf.dtype=fp32", "method.balance_images=32"]
    arrest = ["method.name=arrest", "model.split_bn=false", "method.pretrain_epochs=1", "method.replay_until=1"]
    cfg = apply_overrides(tiny_cfg, [*arrest, *small])  # replay window: all of fine-tuning, however long
    full = run_training(apply_overrides(cfg, ["train.epochs=3"]), tmp_path / "full")
    partial = run_training(apply_overrides(cfg, ["train.epochs=2"]), tmp_path / "part", evaluate_at_end=False)
    (partial / "checkpoints" / "final.pt").unlink()
    saved = json.loads((partial / "config.json").read_text())
    saved["epochs"] = 3  # a 3-epoch run interrupted after epoch 2 (its first fine-tuning epoch)
    (partial / "config.json").write_text(json.dumps(saved))
    resumed = run_training(load_run_config(partial), partial, resume=True)
    a, b = (torch.load(r / "checkpoints" / "final.pt") for r in (full, resumed))
    for part in ("model", "method"):
        assert a[part].keys() == b[part].keys() and all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    a, b = (torch.load(r / "checkpoints" / "latest.pt")["method"] for r in (full, resumed))  # the same teacher
    assert any(k.startswith("teacher.") for k in a) and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_init_paths_are_stored_resolved(tmp_path, monkeypatch):
    from engine.methods.arrest import init_overrides
    from engine.recipes import get_recipe

    monkeypatch.chdir(tmp_path)
    overrides = init_overrides(get_recipe("arrest-resnet18-cifar10"), "runs/std")
    assert f"method.init={tmp_path / 'runs' / 'std'}" in overrides


def test_fine_tuning_starts_without_the_standard_stages_momentum(tiny_cfg):
    """As a fine-tuning run from --init does: a fresh optimizer (zero momentum at its first step)."""
    from engine.train import build_run, train_epoch

    small = ["data.synthetic_size=64", "perf.dtype=fp32", "method.balance_images=32", "train.epochs=2"]
    cfg = apply_overrides(tiny_cfg, ["method.name=arrest", "model.split_bn=false", "method.pretrain_epochs=1", *small])
    run = build_run(cfg)
    seen, step = [], run.optimizer.step

    def spy(*args, **kwargs):  # whether every momentum buffer is zero before this step
        seen.append(all(not s["momentum_buffer"].any() for s in run.optimizer.state.values()))
        return step(*args, **kwargs)

    run.optimizer.step = spy
    train_epoch(run, 1)
    assert seen[0] and not seen[1]  # momentum builds up during standard training
    seen.clear()
    train_epoch(run, 2)  # fine-tuning's first epoch
    assert seen[0] and not seen[1]
    assert [run.method.fresh_optimizer_at(e) for e in (1, 2, 3)] == [False, True, False]


def test_final_checkpoints_leave_out_the_frozen_teacher_and_keep_trained_networks(tiny_cfg):
    """final.pt stored the method's whole state: ARREST's frozen teacher (a second copy of the network, 185 MB for
    WRN-34-10) that nothing reads from it (latest.pt keeps it to resume). Trained second networks stay (LBGAT's)."""
    from engine.train import trained_state

    _, _, arrest, _ = setup(tiny_cfg)
    full, kept = arrest.state_dict(), trained_state(arrest)
    assert any(k.startswith("teacher.") for k in full) and not any(k.startswith("teacher.") for k in kept)
    assert set(kept) == {k for k in full if not k.startswith("teacher.")}  # its own buffers (teacher_ready) stay
    _, _, lbgat, _ = method_case(tiny_cfg, "lbgat")
    assert trained_state(lbgat).keys() == lbgat.state_dict().keys() and len(lbgat.state_dict()) > 0
