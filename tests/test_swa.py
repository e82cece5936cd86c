"""SWA (METHOD 4): the equal-weight running mean of the parameters, and the adv-BN re-estimation on attacked data
(all BN statistics reset, the adv BNs' rebuilt as a cumulative average over one pass, the clean BNs left reset)."""

import copy

import pytest
import torch

from engine.attacks import pgd
from engine.config import AttackConfig, ModelConfig, SWAConfig
from engine.models import build_model
from engine.perf import Perf
from engine.swa import SWA

NO_AMP = Perf(torch.device("cpu"), torch.float32, False, False, "off").autocast


def test_average_of_snapshots_and_adv_bn_reestimation():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="resnet18", width=8, split_bn=True), 10)
    swa = SWA(model, SWAConfig(enabled=True, start_epoch=2, every=2))
    snapshots = []
    for step in range(1, 8):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        epoch = 1 if step < 3 else 2  # averaging starts in epoch 2, every second step: steps 4 and 6
        swa.maybe_update(model, epoch, step)
        if epoch == 2 and step % 2 == 0:
            snapshots.append({k: p.detach().clone() for k, p in model.named_parameters()})
    assert swa.count == len(snapshots) == 2
    g = torch.Generator().manual_seed(1)
    batches = [(torch.rand(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(3)]
    model.train()
    with torch.no_grad():  # the live model's BN statistics: non-trivial, and to be left as they are
        model(batches[0][0] * 2, bn="clean"), model(batches[0][0] * 3, bn="adv")
    live = {k: v.clone() for k, v in model.state_dict().items()}
    attack = AttackConfig(num_steps=1, start="none", step_size=8 / 255)  # one deterministic step: x' != x
    averaged = swa.averaged_model(model, batches, attack, autocast=NO_AMP)
    for name, p in averaged.named_parameters():
        torch.testing.assert_close(p, sum(s[name] for s in snapshots) / len(snapshots), msg=name)
    # the attack runs in train mode on batch statistics, so x' does not depend on the running ones: a copy attacks
    twin = copy.deepcopy(averaged).train()
    attacked = [pgd(twin, x, y, attack, bn="adv", train=True) for x, y in batches]
    assert all((xa - x).abs().max() > 4 / 255 for xa, (x, _) in zip(attacked, batches, strict=True))
    with torch.no_grad():
        first = [averaged.conv1(xa) for xa in attacked]  # what the first adv BN saw
        clean = [averaged.conv1(x) for x, _ in batches]
    bn = averaged.bn1
    expected_mean = torch.stack([f.mean((0, 2, 3)) for f in first]).mean(0)
    torch.testing.assert_close(bn.adv.running_mean, expected_mean)
    torch.testing.assert_close(bn.adv.running_var, torch.stack([f.var((0, 2, 3)) for f in first]).mean(0))
    clean_mean = torch.stack([f.mean((0, 2, 3)) for f in clean]).mean(0)
    assert not torch.allclose(bn.adv.running_mean, clean_mean, rtol=1e-4, atol=1e-4)  # attacked data, not clean
    # 3 batches counted: the attack's forwards (3 more in train mode) are not
    assert bn.adv.num_batches_tracked.item() == len(batches) and bn.adv.momentum == model.bn1.adv.momentum
    assert torch.equal(bn.clean.running_mean, torch.zeros_like(bn.clean.running_mean))  # reset, not re-estimated
    assert torch.equal(bn.clean.running_var, torch.ones_like(bn.clean.running_var))
    assert not averaged.training
    assert all(torch.equal(v, live[k]) for k, v in model.state_dict().items())  # the live model untouched


def test_adv_bn_reestimation_equals_the_cumulative_average_of_momentum_none_bit_for_bit(monkeypatch):
    """The re-estimation sets each batch's factor 1/k itself instead of BN's momentum None, which reads every BN's
    batch count back to the host on every train-mode forward (a sync per BN per attack step): the statistics are
    the ones momentum None gives, bit for bit, and no forward reads a count."""
    from engine import swa as swa_module

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="resnet18", width=8, split_bn=True), 10)
    g = torch.Generator().manual_seed(2)
    batches = [(torch.rand(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(4)]
    attack = AttackConfig(num_steps=2, start="none", step_size=2 / 255)
    ours = copy.deepcopy(model)
    reads = []
    real_float = float

    def counting_float(value):
        if isinstance(value, torch.Tensor):
            reads.append(value)
        return real_float(value)

    import torch.nn.modules.batchnorm as batchnorm

    monkeypatch.setattr(batchnorm, "float", counting_float, raising=False)
    swa_module.reestimate_adv_bn(ours, batches, attack, NO_AMP, show=False)
    assert reads == []  # no BN read its count back: momentum None's float(num_batches_tracked)
    # the previous way: momentum None throughout
    norms = swa_module._batch_norms(model)
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for x, y in batches:
        with swa_module.frozen_bn_stats(model):
            x_adv = pgd(model, x, y, attack, bn="adv", train=True, autocast=NO_AMP)
        with torch.no_grad():
            model(x_adv, bn="adv")
    assert reads  # momentum None does read them (the probe sees the reads it counts)
    for (name, a), b in zip(ours.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert all(m.momentum == 0.1 for m in swa_module._batch_norms(ours))  # restored


def test_a_run_resumed_after_its_last_epoch_reestimates_on_that_epochs_batches(tiny_cfg, tmp_path):
    """Killed after the last epoch's checkpoint, before final.pt (in the SWA re-estimation or the evaluation): the
    resumed run trains no epoch, and re-estimates the adv BNs on the last epoch's batches, as the run would have."""
    from engine.config import apply_overrides
    from engine.train import load_run_config, run_training

    small = ["data.synthetic_size=64", "train.epochs=2", "perf.dtype=fp32", "method.balance_images=32"]
    cfg = apply_overrides(tiny_cfg, [*small, "swa.enabled=true", "swa.start_epoch=1", "swa.every=1"])
    full = run_training(cfg, tmp_path / "full", evaluate_at_end=False)
    (full / "checkpoints" / "final.pt").rename(tmp_path / "final.pt")
    resumed = run_training(load_run_config(full), full, resume=True, evaluate_at_end=False)
    a, b = torch.load(tmp_path / "final.pt"), torch.load(resumed / "checkpoints" / "final.pt")
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), "the re-estimated BNs differ"


def test_swa_turned_on_for_a_resume_averages_from_there_or_is_refused_at_once(tiny_cfg, tmp_path, capsys):
    """A run trained without SWA, then config.json edited to turn it on (--resume takes no --set swa.*): the
    checkpoint holds no average, and the resume averages the steps still to come (it kept the empty one, which
    raised a KeyError at the first averaging step, on every later resume too). With no step left to average, it
    is refused before training. The metrics rows' wall_seconds go on from the earlier process's."""
    import json

    from engine.config import apply_overrides
    from engine.errors import UserError
    from engine.train import load_run_config, run_training

    small = ["data.synthetic_size=64", "train.epochs=2", "perf.dtype=fp32", "method.balance_images=32"]
    run = run_training(apply_overrides(tiny_cfg, small), tmp_path / "run", evaluate_at_end=False)
    config = json.loads((run / "config.json").read_text())
    config["epochs"] = 3
    config["swa"] |= {"enabled": True, "start_epoch": 1, "every": 4}  # 2 steps per epoch: only step 4, trained
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="SWA would average nothing: it was off for the 2 epochs trained"):
        run_training(load_run_config(run), run, resume=True, evaluate_at_end=False)
    assert torch.load(run / "checkpoints" / "latest.pt")["epoch"] == 2  # nothing trained, nothing lost

    config["swa"]["every"] = 1
    (run / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    run_training(load_run_config(run), run, resume=True, evaluate_at_end=False)
    out = capsys.readouterr().out
    assert "SWA was off for the 2 epochs trained: it averages from epoch 3 on (2 updates)" in out
    assert "SWA averages" not in out  # said once
    latest = torch.load(run / "checkpoints" / "latest.pt")
    assert latest["epoch"] == 3 and latest["step"] == 6 and latest["swa"]["count"] == 2  # epoch 3's steps
    assert latest["swa"]["average"] and set(latest["swa"]["average"]) <= set(latest["model"])
    assert (run / "checkpoints" / "final.pt").exists()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[1]["wall_seconds"] >= rows[0]["wall_seconds"] + rows[1]["epoch_seconds"] - 0.02  # rounding
    assert rows[2]["wall_seconds"] >= rows[1]["wall_seconds"] + rows[2]["epoch_seconds"] - 0.02
    config["epochs"] = 5  # trained on: the count said at start (swa.every counts steps: a batch per process
    (run / "config.json").write_text(json.dumps(config))  # changes it, 2 snapshots where one process made 20)
    run_training(load_run_config(run), run, resume=True, evaluate_at_end=False)
    said = "SWA averages 4 snapshots from here: every 1 steps from epoch 4 (2 steps per epoch)"
    assert said in capsys.readouterr().out


def test_swa_turned_off_and_on_again_keeps_its_average(tiny_cfg, tmp_path, capsys):
    """config.json may turn SWA off (the final network is then the plain one) and on again: the average collected
    before is carried over while it is off and averaged on from when it is back (it was dropped: the next checkpoint
    held an empty one, and the resume after said SWA had been off for every epoch trained)."""
    import json

    from engine.config import apply_overrides
    from engine.train import load_run_config, run_training

    small = ["data.synthetic_size=64", "train.epochs=2", "perf.dtype=fp32", "method.balance_images=32",
             "swa.enabled=true", "swa.start_epoch=1", "swa.every=1"]  # fmt: skip
    run = run_training(apply_overrides(tiny_cfg, small), tmp_path / "run", evaluate_at_end=False)
    before = torch.load(run / "checkpoints" / "latest.pt")["swa"]
    assert before["count"] == 4  # 2 steps per epoch
    config = json.loads((run / "config.json").read_text())
    config["epochs"], config["swa"]["enabled"] = 3, False
    (run / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    run_training(load_run_config(run), run, resume=True, evaluate_at_end=False)
    assert "the checkpoint's average of 4 snapshots is kept, not updated" in capsys.readouterr().out
    kept = torch.load(run / "checkpoints" / "latest.pt")["swa"]
    assert kept["count"] == 4 and all(torch.equal(kept["average"][k], v) for k, v in before["average"].items())
    config["epochs"], config["swa"] = 4, config["swa"] | {"enabled": True, "start_epoch": 4, "every": 2}
    (run / "config.json").write_text(json.dumps(config))  # back on at another cadence: the average would mix two
    from engine.config import ConfigError

    with pytest.raises(ConfigError, match="average of 4 snapshots was taken with swa.start_epoch=1, swa.every=1"):
        run_training(load_run_config(run), run, resume=True, evaluate_at_end=False)
    config["swa"] |= {"start_epoch": 0, "every": 1}  # start_epoch 0 is epoch 1: the same cadence
    (run / "config.json").write_text(json.dumps(config))
    run_training(load_run_config(run), run, resume=True, evaluate_at_end=False)
    out = capsys.readouterr().out
    assert "SWA was off" not in out and "SWA averages 2 snapshots from here" in out
    assert torch.load(run / "checkpoints" / "latest.pt")["swa"]["count"] == 6  # epochs 1, 2 and 4
