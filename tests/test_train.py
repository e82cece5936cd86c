import json
import re
from pathlib import Path

import pytest
import torch
from hostile import RunsCode

from engine.config import apply_overrides
from engine.train import run_training


def read_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_smoke_run_writes_a_complete_run_dir(tiny_cfg, tmp_path):
    run = run_training(tiny_cfg, tmp_path / "run")
    assert {p.name for p in run.iterdir()} >= {
        "config.json",
        "env.json",
        "metrics.jsonl",
        "results.json",
        "checkpoints",
    }
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"latest.pt", "final.pt"}
    rows = read_rows(run)
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in (
        "loss",
        "cls",
        "inv",
        "adv_weight",
        "lr",
        "train_acc_adv",
        "train_acc_clean",
        "images_per_s",
        "tflop_per_s",
        "wall_seconds",
    ):
        assert key in rows[0], key
    assert rows[0]["lr"] == pytest.approx(0.02)
    env = json.loads((run / "env.json").read_text())
    assert env["torch"] == torch.__version__ and "git_commit" in env and env["git_dirty"] in (True, False, None)
    results = json.loads((run / "results.json").read_text())["results"]
    assert set(results) == {"clean", "pgd20"} and results["pgd20"]["accuracy"] <= results["clean"]["accuracy"]
    assert results["clean"]["num_examples"] == 64


def test_resume_gives_identical_results(tiny_cfg, tmp_path, capsys):
    """A run stopped after epoch 1 and resumed ends as the uninterrupted one; it resumed (a restart from epoch 1
    would also end alike: same seed, same code): it says so, and its epoch-1 row is the first process's."""
    cfg = apply_overrides(tiny_cfg, ["train.epochs=3", "eval.attacks=clean"])
    full = run_training(cfg, tmp_path / "full")
    partial = run_training(apply_overrides(cfg, ["train.epochs=1"]), tmp_path / "resumed", evaluate_at_end=False)
    (partial / "checkpoints" / "final.pt").unlink()
    # a run interrupted after epoch 1: its saved config says 3 epochs
    cfg_json = json.loads((partial / "config.json").read_text())
    cfg_json["epochs"] = 3
    (partial / "config.json").write_text(json.dumps(cfg_json))
    from engine.train import load_run_config

    first_row = (partial / "metrics.jsonl").read_text().splitlines()[0]
    capsys.readouterr()
    resumed = run_training(load_run_config(partial), partial, resume=True)
    assert "resuming after epoch 1/3" in capsys.readouterr().out
    assert (resumed / "metrics.jsonl").read_text().splitlines()[0] == first_row  # kept, not trained again
    drop = ("epoch_seconds", "images_per_s", "tflop_per_s", "wall_seconds")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in drop} for r in rows]  # noqa: E731
    assert strip(read_rows(full)) == strip(read_rows(resumed))
    a = torch.load(full / "checkpoints" / "final.pt")["model"]
    b = torch.load(resumed / "checkpoints" / "final.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_swa_run(tiny_cfg, tmp_path):
    cfg = apply_overrides(tiny_cfg, ["swa.enabled=true", "swa.start_epoch=2", "swa.every=2", "eval.attacks=clean"])
    run = run_training(cfg, tmp_path / "swa")
    final = torch.load(run / "checkpoints" / "final.pt")["model"]
    latest = torch.load(run / "checkpoints" / "latest.pt")["model"]
    assert not torch.equal(final["conv1.weight"], latest["conv1.weight"])  # the average, not the last weights
    assert final["bn1.clean.num_batches_tracked"] == 0  # all BN stats reset; only adv BNs re-estimated
    assert final["bn1.adv.num_batches_tracked"] == 8  # one pass: 256 images / batch 32
    assert json.loads((run / "results.json").read_text())["swa"] is True


@pytest.mark.data
def test_short_real_data_run_beats_chance(cifar_dir, tmp_path):
    from engine.recipes import get_recipe

    cfg = apply_overrides(
        get_recipe("demo"),
        [
            f"data.data_dir={cifar_dir}",
            "train.epochs=3",
            "data.train_subset=4096",
            "eval.attacks=clean,pgd20",
            "eval.num_examples=500",
            "attack.num_steps=2",
            "attack.step_size=5/255",
            "optim.milestones=2",
            "train.batch_size=128",
            "optim.first_epoch_lr=0.02",
        ],
    )
    results = json.loads((run_training(cfg, tmp_path / "real") / "results.json").read_text())["results"]
    assert results["clean"]["accuracy"] > 0.25  # chance is 0.10; this seed reads 0.306 here (4,096 images)
    assert results["pgd20"]["accuracy"] <= results["clean"]["accuracy"]


def test_a_crafted_checkpoint_runs_no_code_on_resume(tiny_cfg, tmp_path):
    from engine.errors import UserError

    cfg = apply_overrides(tiny_cfg, ["train.epochs=2", "eval.attacks=clean"])
    run = run_training(apply_overrides(cfg, ["train.epochs=1"]), tmp_path / "run", evaluate_at_end=False)
    marker = tmp_path / "pwned"
    torch.save({"epoch": 1, "payload": RunsCode(marker)}, run / "checkpoints" / "latest.pt")
    with pytest.raises(UserError, match="not a readable checkpoint"):  # the CLI: one line, exit 2
        run_training(cfg, run, resume=True)
    assert not marker.exists()


def test_resume_loads_the_checkpoint_on_the_cpu(tiny_cfg, tmp_path, monkeypatch):
    """RNG states must reach torch.set_rng_state / torch.cuda.set_rng_state as CPU byte tensors: the checkpoint is
    read with map_location="cpu" (mapping it to a CUDA device broke resume on GPUs)."""
    seen = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: seen.append(k) or real_load(*a, **k))
    cfg = apply_overrides(tiny_cfg, ["train.epochs=2", "eval.attacks=clean"])
    run = run_training(apply_overrides(cfg, ["train.epochs=1"]), tmp_path / "run", evaluate_at_end=False)
    run_training(cfg, run, resume=True, evaluate_at_end=False)
    assert seen and all(k.get("map_location") == "cpu" and k.get("weights_only") for k in seen)


def test_a_checkpoint_without_fp16_resumes_where_fp16_is_chosen(tiny_cfg):
    """perf.dtype=auto picks fp16 with a gradient scaler on a GPU without bf16; a run started on bf16/fp32 hardware
    saved a disabled scaler's empty state, which an enabled scaler refuses: the resumed run's scaler starts afresh."""
    from engine.train import build_run

    run = build_run(apply_overrides(tiny_cfg, ["eval.attacks=clean"]))
    state = run.state_dict()
    assert state["scaler"] == {}
    run.scaler = torch.amp.GradScaler("cpu", enabled=True)  # as on an fp16 GPU
    run.load_state_dict(state)
    assert run.scaler.is_enabled() and run.scaler.get_scale() == 65536.0
    # and an fp16 run's own scaler comes back as it was saved (the scale it had lowered to)
    run.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    saved = run.state_dict()
    assert saved["scaler"]["scale"] == 1024.0
    resumed = build_run(apply_overrides(tiny_cfg, ["eval.attacks=clean"]))
    resumed.scaler = torch.amp.GradScaler("cpu", enabled=True)
    resumed.load_state_dict(saved)
    assert resumed.scaler.get_scale() == 1024.0 and resumed.scaler.get_growth_interval() == 7


def test_a_diverged_run_stops_keeps_its_last_checkpoint_and_writes_no_results(tiny_cfg, tmp_path):
    from engine.train import Diverged

    run = run_training(apply_overrides(tiny_cfg, ["train.epochs=1"]), tmp_path / "run", evaluate_at_end=False)
    (run / "checkpoints" / "final.pt").unlink()
    good = (run / "checkpoints" / "latest.pt").read_bytes()
    cfg = apply_overrides(tiny_cfg, ["train.epochs=2", "optim.lr=1e30"])
    with pytest.raises(Diverged, match="epoch 2"):
        run_training(cfg, run, resume=True)
    assert (run / "checkpoints" / "latest.pt").read_bytes() == good
    assert not (run / "results.json").exists() and [r["epoch"] for r in read_rows(run)] == [1]


@pytest.mark.parametrize("value", ["inf", "nan", "-inf", "8/0", "1e999"])
def test_non_finite_config_values_are_refused(tiny_cfg, value):
    from engine.config import ConfigError

    for key in ("attack.step_size", "optim.lr", "method.invariance_weight"):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            apply_overrides(tiny_cfg, [f"{key}={value}"])


def test_a_seed_torch_cannot_take_is_refused_before_anything_is_written(tiny_cfg, tmp_path, capsys):
    from engine.cli import main
    from engine.config import ConfigError

    with pytest.raises(ConfigError, match="train.seed"):
        apply_overrides(tiny_cfg, [f"train.seed={2**64}"])
    run = tmp_path / "run"
    assert main(["train", "--recipe", "smoke", "--set", f"train.seed={2**64}", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "train.seed" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not run.exists()


def test_resume_trims_metrics_to_the_checkpoint_and_cleans_temp_files(tiny_cfg, tmp_path, capsys):
    cfg = apply_overrides(tiny_cfg, ["train.epochs=2", "eval.attacks=clean"])
    run = run_training(apply_overrides(cfg, ["train.epochs=1"]), tmp_path / "run", evaluate_at_end=False)
    (run / "checkpoints" / "final.pt").unlink()
    with (run / "metrics.jsonl").open("a") as f:  # a kill after epoch 2's row, before its checkpoint ...
        f.write(json.dumps({"epoch": 2, "loss": 1.0}) + "\n" + '{"epoch": 3, "lo')  # ... and a half line
    with (run / "metrics.jsonl").open("ab") as f:  # whose tail a power cut left undecodable (a traceback before)
        f.write(b"\xff\xfe")
    stale = [run / "checkpoints" / ".latest.pt.ab_c1234", run / ".config.json.k2j4l5m9"]  # mkstemp's 8 characters
    # a user's hidden files, and the temporary of an `arat export RUN/x.pt` writing at the same moment, are not the
    # run's: they stay (a resume deleted every `.*.*` there)
    kept = [run / ".notes.txt", run / ".x.pt.abcd1234", run / "checkpoints" / ".mine.pt"]
    for path in stale + kept:
        path.write_bytes(b"partial")
    run_training(cfg, run, resume=True, evaluate_at_end=False)
    assert [r["epoch"] for r in read_rows(run)] == [1, 2]
    assert not any(path.exists() for path in stale) and all(path.exists() for path in kept)


def test_a_finished_run_whose_latest_checkpoint_was_removed_is_evaluated_not_trained_on(tiny_cfg, tmp_path):
    """A finished run's latest.pt may go (README; reproduce.sh PRUNE=1): training it on is refused in one line that
    says where it went and what still works, before anything is written."""
    from engine.rundir import RunDirError

    cfg = apply_overrides(tiny_cfg, ["train.epochs=1", "eval.attacks=clean"])
    run = run_training(cfg, tmp_path / "run", evaluate_at_end=False)
    (run / "checkpoints" / "latest.pt").unlink()
    before = sorted(p.name for p in run.rglob("*"))
    with pytest.raises(RunDirError, match=r"finished its training .*`arat eval .*PRUNE=1\): copy it back, or train"):
        run_training(apply_overrides(cfg, ["train.epochs=2"]), run, resume=True, evaluate_at_end=False)
    assert sorted(p.name for p in run.rglob("*")) == before


def test_resume_without_a_checkpoint_says_it_starts_over(tiny_cfg, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "loss": 1.0}) + "\n")
    run_training(apply_overrides(tiny_cfg, ["train.epochs=1"]), run, resume=True, evaluate_at_end=False)
    assert "has no checkpoint yet" in capsys.readouterr().out
    assert [r["epoch"] for r in read_rows(run)] == [1]


def test_a_compiled_run_says_it_compiles_and_times_its_first_step(tiny_cfg, tmp_path, capsys):
    """A compiled run's first steps build its graphs (minutes on a CPU): said before the first epoch, timed in that
    epoch's row and line; a compiled run that resumes compiles again (a new process), one that is off says nothing."""
    compiled = apply_overrides(tiny_cfg, ["train.epochs=2", "eval.attacks=clean", "perf.compile=on",
                                          "perf.compile_backend=eager"])  # fmt: skip
    run = run_training(compiled, tmp_path / "run", evaluate_at_end=False)
    out = capsys.readouterr().out
    assert "torch.compile builds the step's graphs" in out and "compiling: " in out
    rows = read_rows(run)
    assert rows[0]["first_step_seconds"] > 0 and "first_step_seconds" not in rows[1]
    assert 0 <= rows[0]["epoch_start_seconds"] <= rows[0]["first_step_seconds"]
    run_training(apply_overrides(compiled, ["train.epochs=3"]), run, resume=True, evaluate_at_end=False)
    assert "first_step_seconds" in read_rows(run)[2] and "compiling: " in capsys.readouterr().out
    plain = run_training(apply_overrides(tiny_cfg, ["train.epochs=1"]), tmp_path / "plain", evaluate_at_end=False)
    assert "torch.compile" not in capsys.readouterr().out and "first_step_seconds" not in read_rows(plain)[0]


def test_one_permission_policy_and_env_json_kept_on_resume(tiny_cfg, tmp_path):
    cfg = apply_overrides(tiny_cfg, ["train.epochs=2", "eval.attacks=clean"])
    run = run_training(apply_overrides(cfg, ["train.epochs=1"]), tmp_path / "run", evaluate_at_end=False)
    first = json.loads((run / "env.json").read_text())
    run_training(cfg, run, resume=True)
    env = json.loads((run / "env.json").read_text())
    assert {k: v for k, v in env.items() if k != "resumes"} == first and len(env["resumes"]) == 1
    # the switches as resolved (config.json keeps auto): the precision each process trained in is on record
    assert first["perf"]["dtype"] in ("bf16", "fp32") and env["resumes"][0]["perf"] == first["perf"]
    modes = {p.relative_to(run).as_posix(): p.stat().st_mode & 0o777 for p in run.rglob("*") if p.is_file()}
    assert len(set(modes.values())) == 1, modes


HOLDER = """
import sys, time
from engine.rundir import RunDir
with RunDir(sys.argv[1]).open_for_writing(True):
    print("locked", flush=True)
    sys.stdin.readline() if sys.argv[2] == "stdin" else time.sleep(float(sys.argv[2]))  # held until told, or a time
"""


def test_a_second_process_cannot_write_into_a_run_in_use(tiny_cfg, tmp_path, monkeypatch, capsys):
    import subprocess
    import sys

    from engine import train
    from engine.rundir import RunDir, RunDirError

    monkeypatch.setattr(train, "RESUME_LOCK_WAIT_S", 1.0)
    cfg = apply_overrides(tiny_cfg, ["train.epochs=2", "eval.attacks=clean"])
    run = run_training(apply_overrides(cfg, ["train.epochs=1"]), tmp_path / "run", evaluate_at_end=False)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run), "600"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match=f"in use by process {proc.pid}"):
            run_training(cfg, run, resume=True)
        assert f"in use by process {proc.pid}" in capsys.readouterr().err  # (said while it waited)
    finally:
        proc.kill()
        proc.wait()
    with RunDir(run).open_for_writing(resume=True):  # free again once the holder is gone
        pass
    assert [r["epoch"] for r in read_rows(run)] == [1]


def test_a_resume_waits_for_a_holder_that_is_leaving(tiny_cfg, tmp_path, capsys, monkeypatch):
    """helper-152: a scheduler's replacement job (a Kubernetes pod, a requeue) started while the stopped one was still
    leaving was refused at once, a failure the scheduler does not retry: a resume waits up to RESUME_LOCK_WAIT_S for
    the holder to let go, saying so."""
    import subprocess
    import sys

    from engine import rundir

    cfg = apply_overrides(tiny_cfg, ["train.epochs=2", "eval.attacks=clean"])
    run = run_training(apply_overrides(cfg, ["train.epochs=1"]), tmp_path / "run", evaluate_at_end=False)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run), "stdin"], stdout=subprocess.PIPE,
                            stdin=subprocess.PIPE, text=True)  # fmt: skip
    real_flock_within = rundir.flock_within

    def leaving_once_tried(fd, wait_s, poll_s=0.2):  # the holder lets go once the resume found it held
        if wait_s > 0 and not proc.stdin.closed:
            proc.stdin.close()
        return real_flock_within(fd, wait_s, poll_s)

    monkeypatch.setattr(rundir, "flock_within", leaving_once_tried)
    try:
        assert proc.stdout.readline().strip() == "locked"
        run_training(cfg, run, resume=True, evaluate_at_end=False)
    finally:
        proc.kill()
        proc.wait()
    assert re.search(rf"in use by process {proc.pid} on \S+: waiting up to 120 s", capsys.readouterr().err)
    assert [r["epoch"] for r in read_rows(run)] == [1, 2]


def test_progress_is_on_disk_before_an_epoch_ends(tiny_cfg, tmp_path, monkeypatch):
    from engine.rundir import RunDir

    written, real_write = [], RunDir.write_json

    def recording_write(self, name, data, durable=True):
        written.append((name, dict(data), (self.path / "metrics.jsonl").exists()))
        real_write(self, name, data, durable)

    monkeypatch.setattr(RunDir, "write_json", recording_write)
    run_training(apply_overrides(tiny_cfg, ["train.epochs=1"]), tmp_path / "run", evaluate_at_end=False)
    progress = [(row, metrics_exist) for name, row, metrics_exist in written if name == "progress.json"]
    assert progress[0][0]["step"] < progress[0][0]["steps"] and not progress[0][1]  # mid-epoch, before any row
    assert json.loads((tmp_path / "run" / "progress.json").read_text())["step"] == progress[-1][0]["steps"]


@pytest.mark.parametrize("nesterov", [False, True])
def test_the_cpu_optimizer_is_foreach_and_updates_as_the_per_parameter_loop(tiny_cfg, nesterov):
    """build_optimizer on a CPU uses torch's foreach SGD (one op per step per quantity instead of ~5 per parameter;
    the compiled CPU step dispatched 1,557 aten ops with the loop and 1,073 with foreach): the same updates, bit for
    bit, as torch's per-parameter loop; optim.nesterov (no recipe sets it) reaches it too."""
    from engine.train import build_optimizer

    tiny_cfg.optim.nesterov = nesterov
    torch.manual_seed(0)
    params = [torch.randn(5, 3, requires_grad=True), torch.randn(7, requires_grad=True)]
    twins = [p.detach().clone().requires_grad_(True) for p in params]
    fast = build_optimizer(params, tiny_cfg, torch.device("cpu"))
    o = tiny_cfg.optim
    loop = torch.optim.SGD(twins, lr=o.lr_at(1), momentum=o.momentum, weight_decay=o.weight_decay,
                           nesterov=o.nesterov, foreach=False)  # fmt: skip
    assert fast.defaults["foreach"] and not fast.defaults["fused"] and fast.defaults["nesterov"] is nesterov
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for group, opt in ((params, fast), (twins, loop)):
            for p, g in zip(group, grads, strict=True):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(params, twins, strict=True):
        assert torch.equal(a, b)


def test_the_epoch_line_says_how_much_training_is_left():
    from engine.train import clock, epoch_line

    assert [clock(s) for s in (0, 45, 89.4, 200, 5399, 5400, 11_100, 172_799, 190_800)] == [
        "0s", "45s", "89s", "3m", "90m", "1h30m", "3h05m", "47h59m", "2d05h"]  # fmt: skip
    row = {"epoch": 1, "loss": 2.0, "lr": 0.1, "images_per_s": 500.0, "epoch_seconds": 100.0}
    assert epoch_line(row, 3).endswith("100s  ~3m of training left")  # 2 more epochs at 100 s
    assert "left" not in epoch_line(row | {"epoch": 3}, 3)  # the last epoch: evaluation comes next
    compiled = row | {"epoch_seconds": 400.0, "first_step_seconds": 300.0}  # the compiling is not paid again
    assert epoch_line(compiled, 3).endswith("(compiling: 300s to the first step)  ~3m of training left")
    # 120 s of the 300 went to the epoch-start pass, outside epoch_seconds: 400 - 180 = 220 s per epoch ahead
    slow_start = compiled | {"epoch_start_seconds": 120.0}
    assert epoch_line(slow_start, 3).endswith("~7m of training left")
    # the checkpoint written after each epoch, outside epoch_seconds (seconds for WRN-34-10 with SWA): 2 x 130 s
    assert epoch_line(row, 3, checkpoint_seconds=30.0).endswith("~4m of training left")


def test_arrest_s_fine_tuning_stage_is_timed_as_compiling(tiny_cfg, tmp_path):
    """ARREST's first fine-tuning epoch builds new graphs (its eval-mode attack, the teacher): its row times the
    compiling apart (first_step_seconds) and its pace leaves it out, as a process's first epoch does (it was
    counted as the pace of the 19 epochs to come)."""
    from engine.config import apply_overrides
    from engine.train import run_training

    cfg = apply_overrides(tiny_cfg, ["method.name=arrest", "model.split_bn=false", "train.epochs=3",
                                     "method.pretrain_epochs=1", "perf.compile=on", "perf.compile_backend=eager",
                                     "eval.attacks=clean"])  # fmt: skip
    run = run_training(cfg, tmp_path / "run", evaluate_at_end=False)
    rows = read_rows(run)
    assert ["first_step_seconds" in r for r in rows] == [True, True, False]


def test_arrest_s_time_left_counts_its_fine_tuning_epochs_at_their_cost(tiny_cfg):
    """ARREST's standard-training epochs cost 3 forward units an image, its fine-tuning ones (PGD-10) 25: at the
    standard stage's pace, its time left read ~2x low (every epoch counted at the current one's cost)."""
    from engine.config import apply_overrides
    from engine.methods import build_method
    from engine.models import build_model
    from engine.train import epoch_line

    cfg = apply_overrides(tiny_cfg, ["method.name=arrest", "model.split_bn=false", "train.epochs=4",
                                     "method.pretrain_epochs=2", "attack.num_steps=10"])  # fmt: skip
    method = build_method(cfg, build_model(cfg.model, 10))
    assert [method.epoch_cost(e) for e in (1, 2, 3, 4)] == [3.0, 3.0, 25.0, 25.0]
    row = {"epoch": 1, "loss": 2.0, "lr": 0.1, "images_per_s": 500.0, "epoch_seconds": 30.0}
    # 1 more standard epoch (30 s) + 2 fine-tuning epochs at 25/3 of its pace (250 s each): 530 s
    assert epoch_line(row, 4, method.epoch_cost).endswith("~9m of training left")
    assert epoch_line(row | {"epoch": 3, "epoch_seconds": 250.0}, 4, method.epoch_cost).endswith("~4m of training left")


def test_a_seed_whose_epoch_stream_torch_cannot_take_is_refused(tiny_cfg):
    """The loader seeds each epoch with seed * 1_000_003 + epoch: 2^50 passed the old bound of 2^63 and crashed in
    epoch 1 (Overflow when unpacking long long), after the run directory was written."""
    from engine.config import ConfigError
    from engine.data.loader import epoch_generator

    with pytest.raises(ConfigError, match=r"train.seed must be in \[0, 2\^32\)"):
        apply_overrides(tiny_cfg, [f"train.seed={2**50}"])
    epoch_generator(2**32 - 1, 1000)  # the largest seed accepted makes a stream torch takes


def test_an_swa_run_that_would_average_nothing_is_refused_before_training(tiny_cfg, tmp_path):
    """SWA from epoch 76 in a 2-epoch run (or too few steps between swa.every's multiples) trained every epoch,
    then stopped on an assert in the final evaluation; now a one-line ConfigError before anything trains."""
    from engine.config import ConfigError
    from engine.swa import SWA

    late = apply_overrides(tiny_cfg, ["swa.enabled=true", "swa.start_epoch=76"])
    with pytest.raises(ConfigError, match="SWA would average nothing: epochs 76-2"):
        run_training(late, tmp_path / "late")
    sparse = apply_overrides(tiny_cfg, ["swa.enabled=true", "swa.start_epoch=2", "swa.every=100"])
    with pytest.raises(ConfigError, match="swa.every=100"):
        run_training(sparse, tmp_path / "sparse")
    assert not (tmp_path / "late" / "metrics.jsonl").exists() and not (tmp_path / "sparse" / "metrics.jsonl").exists()
    model, config = torch.nn.Linear(2, 2), type(tiny_cfg.swa)

    def count(start, every, steps, epochs):
        return SWA(model, config(True, start, every)).updates(steps, epochs)

    assert count(2, 2, 8, 2) == 4  # steps 10, 12, 14, 16
    assert count(2, 3, 8, 2) == 3  # 9, 12, 15
    assert count(0, 5, 8, 2) == count(1, 5, 8, 2) == 3  # 5, 10, 15
    assert count(3, 1, 8, 2) == 0 and SWA(model, config(False, 1, 1)).updates(8, 2) == 0
    assert SWA(model, config(False, 1, 1)).average == {}  # no fp32 copy of the weights with SWA off


def test_training_on_past_a_finished_end_sets_its_results_aside(tiny_cfg, tmp_path, capsys):
    """A finished run whose train.epochs is raised and resumed: its final.pt, results.json and a later eval.json
    move to previous-epoch-N/ before it trains on. A stop during the new final evaluation then finishes that
    evaluation on resume (results.json had made it say "nothing to train" and keep the shorter run's figures)."""
    from engine.train import load_run_config

    cfg = apply_overrides(tiny_cfg, ["train.epochs=1", "eval.attacks=clean"])
    run = run_training(cfg, tmp_path / "run")
    (run / "eval.json").write_text("{}")
    first = json.loads((run / "results.json").read_text())
    saved = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(saved | {"epochs": 2}))
    run_training(load_run_config(run), run, resume=True, evaluate_at_end=False)
    aside = run / "previous-epoch-1"
    assert sorted(p.name for p in aside.iterdir()) == ["eval.json", "final.pt", "flags.json", "results.json"]
    assert not (run / "eval" / "flags.json").exists()  # the earlier network's flags (helper-84: merged into)
    assert json.loads((aside / "results.json").read_text()) == first
    assert not (run / "results.json").exists() and not (run / "eval.json").exists()
    assert "moved to" in capsys.readouterr().out
    final = torch.load(run / "checkpoints" / "final.pt")
    assert final["epoch"] == 2 and not final["evaluate_at_end"]


def test_an_epoch_whose_last_update_made_a_weight_nan_keeps_the_last_good_checkpoint(tiny_cfg, tmp_path, monkeypatch):
    """The loss is read before each update: an epoch whose last update left a NaN weight passed the loss check and
    its checkpoint made every resume diverge at once. The weights are checked before the checkpoint is written."""
    from engine import train
    from engine.train import Diverged

    real = train.train_epoch

    def poisoned(run, epoch, on_progress=None):
        row = real(run, epoch, on_progress)
        if epoch == 2:
            with torch.no_grad():
                weight = next(run.nets.raw.parameters())
                weight[(0,) * weight.dim()] = float("nan")
        return row

    monkeypatch.setattr(train, "train_epoch", poisoned)
    cfg = apply_overrides(tiny_cfg, ["train.epochs=2", "eval.attacks=clean"])
    with pytest.raises(Diverged, match="a weight became inf or NaN in epoch 2"):
        run_training(cfg, tmp_path / "run")
    assert torch.load(tmp_path / "run" / "checkpoints" / "latest.pt")["epoch"] == 1
    assert [r["epoch"] for r in read_rows(tmp_path / "run")] == [1]


def test_a_run_whose_training_raises_leaves_its_process_group_without_waiting(tiny_cfg, tmp_path, monkeypatch):
    """A rank whose training raised left its process group alive (NCCL's communicators up to the interpreter's
    exit); it now leaves at once, as `arat eval`'s ranks do, without the wait for the other ranks (they may never
    get there). A run that ends normally leaves after them."""
    from engine import distributed, train

    calls = []
    monkeypatch.setattr(distributed, "shutdown", lambda info, wait=True: calls.append(wait))
    monkeypatch.setattr(train, "train_epoch", lambda run, epoch, on_progress=None: 1 / 0)
    cfg = apply_overrides(tiny_cfg, ["train.epochs=1", "eval.attacks=clean"])
    with pytest.raises(ZeroDivisionError):
        run_training(cfg, tmp_path / "run")
    assert calls == [False]
    monkeypatch.undo()
    calls.clear()
    monkeypatch.setattr(distributed, "shutdown", lambda info, wait=True: calls.append(wait))
    run_training(cfg, tmp_path / "ok")
    assert calls == [True]


def test_a_last_batch_of_one_image_is_refused(tiny_cfg, tmp_path):
    from engine.config import ConfigError

    cfg = apply_overrides(tiny_cfg, ["data.drop_last=false", "data.synthetic_size=257", "data.train_subset=0"])
    with pytest.raises(ConfigError, match="a last batch of 1 image"):
        run_training(cfg, tmp_path / "run")


def test_a_resume_that_would_train_on_other_data_is_refused(tiny_cfg, tmp_path, monkeypatch):
    """With data.synthetic_fallback the data is resolved again in each process: CIFAR-10 present at a resume of a
    run that trained on the synthetic stand-in would have mixed the two without a word (a review found it)."""
    from engine import train
    from engine.rundir import RunDirError
    from engine.train import load_run_config

    fallback = ["data.dataset=cifar10", "data.synthetic_fallback=true", f"data.data_dir={tmp_path / 'none'}"]
    run = run_training(
        apply_overrides(tiny_cfg, [*fallback, "train.epochs=1"]), tmp_path / "run", evaluate_at_end=False
    )
    assert json.loads((run / "env.json").read_text())["dataset"] == "synthetic"
    (run / "checkpoints" / "final.pt").unlink()
    saved = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(saved | {"epochs": 2}))
    monkeypatch.setattr(train, "resolve_dataset", lambda cfg: "cifar10")  # as if CIFAR-10 had been downloaded since
    load_splits = train.load_splits  # (its images stood in: any will do, the resume is refused before training)
    monkeypatch.setattr(train, "load_splits", lambda cfg, seed, dataset=None: load_splits(cfg, seed, "synthetic"))
    with pytest.raises(RunDirError, match="trained on synthetic, but cifar10 would be used now"):
        run_training(load_run_config(run), run, resume=True)
    assert [r["epoch"] for r in read_rows(run)] == [1]


def test_a_resume_on_other_images_of_the_same_dataset_is_refused(tiny_cfg, tmp_path, monkeypatch, cifar_dir):
    """Data was known by its name only: a run resumed from another working directory (data.data_dir is "data",
    relative, by default) or pointed at another copy (the official CIFAR-10 and the JPEG-degraded one) trained its
    remaining epochs on other images without a word (helper-113, reproduced with two CIFAR-10 folders). env.json
    records the training split's fingerprint; a resume on other images is refused in one line, changing nothing."""
    from engine import train
    from engine.rundir import RunDirError
    from engine.train import load_run_config

    real = ["data.dataset=cifar10", f"data.data_dir={cifar_dir}", "data.train_subset=256", "data.test_subset=64"]
    run = run_training(apply_overrides(tiny_cfg, [*real, "train.epochs=1"]), tmp_path / "run", evaluate_at_end=False)
    fingerprint = json.loads((run / "env.json").read_text())["train_data"]
    assert len(fingerprint) == 16
    (run / "checkpoints" / "final.pt").unlink()
    saved = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(saved | {"epochs": 2}))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    load_splits = train.load_splits

    def other_images(cfg, seed, dataset=None):  # another copy under the same name: one pixel differs
        split, test = load_splits(cfg, seed, dataset)
        split.images = split.images.copy()
        split.images[0, 0, 0, 0] ^= 1
        return split, test

    monkeypatch.setattr(train, "load_splits", other_images)
    with pytest.raises(
        RunDirError, match=f"other cifar10 images than {Path(cifar_dir).resolve()}.*fingerprint {fingerprint}, now "
    ):
        run_training(load_run_config(run), run, resume=True)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing written
    monkeypatch.setattr(train, "load_splits", load_splits)  # the images it trained on: it goes on
    run_training(load_run_config(run), run, resume=True, evaluate_at_end=False)
    assert [r["epoch"] for r in read_rows(run)] == [1, 2]
    # a run started before the fingerprint existed: its first resume's is the one later resumes are held to
    env = json.loads((run / "env.json").read_text())
    (run / "env.json").write_text(json.dumps({k: v for k, v in env.items() if k != "train_data"}))
    (run / "checkpoints" / "final.pt").unlink()
    (run / "config.json").write_text(json.dumps(json.loads((run / "config.json").read_text()) | {"epochs": 3}))
    monkeypatch.setattr(train, "load_splits", other_images)
    with pytest.raises(RunDirError, match=f"fingerprint {fingerprint}, now "):
        run_training(load_run_config(run), run, resume=True)


def test_a_checkpoint_from_another_device_leaves_this_device_s_optimizer_kind(tiny_cfg):
    """The param groups of a checkpoint carry its device's fused/foreach flags, and loading them replaced this
    run's: a CPU checkpoint resumed on CUDA ran foreach SGD, which fails under fp16's GradScaler (its fused path);
    here a CUDA checkpoint resumed on the CPU."""
    from engine.config import apply_overrides
    from engine.train import build_run

    cfg = apply_overrides(tiny_cfg, ["data.synthetic_size=64", "perf.dtype=fp32"])
    run = build_run(cfg)
    state = run.state_dict()
    for group in state["optimizer"]["param_groups"]:
        group["fused"], group["foreach"] = True, False  # as written on CUDA
    run.load_state_dict(state)
    assert all(g["fused"] is False and g["foreach"] is True for g in run.optimizer.param_groups)


def test_a_resume_in_the_other_memory_format_lays_the_momentum_out_as_the_parameters(tiny_cfg):
    """--resume takes perf.* now (helper-86): a run checkpointed channels-last and resumed contiguous (or back) kept
    the checkpoint's momentum strides, which CUDA's fused SGD refuses at its first step (a CPU's foreach SGD only
    slows down)."""
    from engine.config import apply_overrides
    from engine.train import build_run, train_step

    cfg = apply_overrides(tiny_cfg, ["data.synthetic_size=64", "perf.dtype=fp32", "perf.channels_last=true"])
    run = build_run(cfg)
    x, y = next(iter(run.train_loader))
    train_step(run, x, y)  # momentum buffers exist
    state = run.state_dict()
    assert any(
        b.dim() == 4 and not b.is_contiguous()
        for b in (s["momentum_buffer"] for s in state["optimizer"]["state"].values())
    )
    other = build_run(apply_overrides(cfg, ["perf.channels_last=false"]))
    other.load_state_dict(state)
    for param, saved in other.optimizer.state.items():
        assert saved["momentum_buffer"].stride() == param.stride()
    train_step(other, x, y)


def test_an_arat_epoch_row_gives_its_tflop_per_s_by_the_benchs_cost_model(tiny_cfg):
    """METHOD 9's cost model in every AR-AT run's metrics: img/s x (2 x attack steps + 6) x F, F counted as
    bench/train_step.py counts it (the same figure its rows give); another method's rows have none (the cost model
    is AR-AT's). The count changes nothing the run computes: one eval-mode forward of one image."""
    import sys

    from engine.train import build_run, epoch_line, train_epoch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from cost_model import forward_units
    from test_bench import resnet18_flops  # the hand count
    from train_step import forward_flops

    run = build_run(apply_overrides(tiny_cfg, ["train.epochs=1"]))
    row = train_epoch(run, 1)
    x = torch.rand(4, 3, 32, 32)
    units = forward_units(run.cfg.attack.num_steps)
    assert run.cfg.model.arch == "resnet18" and units == 2 * run.cfg.attack.num_steps + 6
    assert run.step_flops == resnet18_flops(run.cfg.model.width) * units  # one image's forward, counted by hand
    assert run.step_flops == forward_flops(run.nets.raw, x) * units  # as the bench's rows count it
    assert row["tflop_per_s"] > 0 and row["tflop_per_s"] == pytest.approx(
        row["images_per_s"] * run.step_flops / 1e12, rel=1e-3
    )  # 4 significant digits
    assert f"{row['tflop_per_s']:.3g} TFLOP/s" in epoch_line(row | {"epoch": 1}, 1)
    at = build_run(apply_overrides(tiny_cfg, ["train.epochs=1", "method.name=at", "model.split_bn=false"]))
    assert "tflop_per_s" not in train_epoch(at, 1)
    measured = build_run(apply_overrides(tiny_cfg, ["train.epochs=1", "analysis.grad_sim=true"]))
    assert "tflop_per_s" not in train_epoch(measured, 1)  # two more backwards a step than the cost model counts
    assert "2,390 TFLOP/s" in epoch_line(row | {"epoch": 1, "tflop_per_s": 2390.0}, 1)


def test_the_end_of_training_releases_inductor_s_cuda_graphs_too(monkeypatch):
    """With compile_mode reduce-overhead or max-autotune Inductor keeps the training step's CUDA-graph pool (several
    GB for WRN-34-10) through the evaluation, which sizes its chunks by the device's memory: released with the rest.
    (CUDA only: the branch is driven here with a stand-in run on a CPU.)"""
    from types import SimpleNamespace

    import torch._inductor.cudagraph_trees as trees

    from engine.config import PerfConfig
    from engine.train import release_training_memory

    calls = []
    monkeypatch.setattr(trees, "reset_cudagraph_trees", lambda: calls.append("trees"))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("cache"))
    weight = torch.nn.Parameter(torch.ones(2))
    for mode, want in (("reduce-overhead", ["trees", "cache"]), ("default", ["cache"])):
        calls.clear()
        perf = SimpleNamespace(attack_graphs=None, device=torch.device("cuda"), compiled=True)
        cfg = SimpleNamespace(perf=PerfConfig(compile_mode=mode))
        run = SimpleNamespace(optimizer=torch.optim.SGD([weight], lr=0.1), cfg=cfg, perf=perf, swa=SimpleNamespace())
        release_training_memory(run)
        assert calls == want, mode


def test_the_end_of_training_frees_the_momentum_a_checkpoint_s_state_shares_and_swa_s_average():
    """The last epoch's checkpoint state (Run.state_dict) was still referenced through the closing evaluation, and
    the optimizer's state_dict shares its per-parameter dicts: clearing the optimizer's mapping freed no momentum
    (ResNet-18: 45 MB, WRN-34-10: 185 MB on the device), nor was SWA's average (the same again) dropped."""
    import weakref
    from types import SimpleNamespace

    from engine.config import PerfConfig
    from engine.train import release_training_memory

    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9)
    weight.grad = torch.ones(2)
    optimizer.step()
    held = optimizer.state_dict()  # what a checkpoint's state held
    momentum = weakref.ref(optimizer.state[weight]["momentum_buffer"])
    average = torch.zeros(2)
    swa = SimpleNamespace(average={"weight": average})
    perf = SimpleNamespace(attack_graphs=None, device=torch.device("cpu"), compiled=False)
    run = SimpleNamespace(optimizer=optimizer, cfg=SimpleNamespace(perf=PerfConfig()), perf=perf, swa=swa)
    release_training_memory(run)
    assert momentum() is None and held["state"] == {0: {}} and swa.average == {}


def test_progress_json_is_not_synced_to_disk_every_log_interval(tiny_cfg, tmp_path, monkeypatch):
    """progress.json is rewritten at every log interval: its write was fsynced each time (a stall on a busy disk);
    the checkpoints, config and metrics still are."""
    import engine.rundir

    seen: dict[str, set[bool]] = {}
    write = engine.rundir.atomic_write

    def recording(path, data, durable=True):
        seen.setdefault(Path(path).name, set()).add(durable)
        return write(path, data, durable)

    monkeypatch.setattr(engine.rundir, "atomic_write", recording)
    run_training(apply_overrides(tiny_cfg, ["train.epochs=1", "eval.attacks=clean"]), tmp_path / "run")
    assert seen["progress.json"] == {False}
    assert seen["latest.pt"] == seen["final.pt"] == seen["config.json"] == seen["results.json"] == {True}


def test_a_first_step_the_fp16_scaler_skips_leaves_no_garbage_momentum():
    """Fused SGD makes its momentum buffers with torch.empty_like on its first step and sets them there; a first
    step the scaler skips (inf gradients: the scale starts at 2^16) returned before writing them, and the next real
    step read uninitialized memory as momentum (on CPU: NaN; a T4's fp16 run diverged in its first steps)."""
    from engine.config import TrainConfig
    from engine.train import build_optimizer

    cfg = TrainConfig()
    p = torch.nn.Parameter(torch.ones(4096))
    optimizer = build_optimizer([p], cfg, torch.device("cuda"))  # fused, as on CUDA (CPU tensors run it too)
    scaler = torch.amp.GradScaler("cpu")
    for loss in (lambda: (p * float("inf")).sum(), lambda: p.sum()):  # skipped, then a real step
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss()).backward()
        scaler.step(optimizer)
        scaler.update()
    step = cfg.optim.lr_at(1) * (1 + cfg.optim.weight_decay)  # one plain SGD step from zero momentum
    torch.testing.assert_close(p.detach(), torch.full((4096,), 1 - step), rtol=0, atol=1e-6)


def test_zero_momentum_buffers_take_the_same_steps_as_none(tiny_cfg):
    """Seeding the buffers with zeros changes no step: buffer = 0 * momentum + gradient, bit for bit."""
    from engine.train import build_optimizer

    torch.manual_seed(0)
    weights = [torch.randn(64, 3, 3, 3), torch.randn(10)]
    grads = [[torch.randn_like(w) for w in weights] for _ in range(3)]
    for fused in ("cpu", "cuda"):  # foreach and fused SGD
        results = []
        for seeded in (True, False):
            params = [torch.nn.Parameter(w.clone()) for w in weights]
            optimizer = build_optimizer(params, tiny_cfg, torch.device(fused))
            if not seeded:
                optimizer.state.clear()
            for step in grads:
                for param, g in zip(params, step, strict=True):
                    param.grad = g.clone()
                optimizer.step()
            results.append([param.detach().clone() for param in params])
        for a, b in zip(*results, strict=True):
            assert torch.equal(a, b), fused


def test_an_epoch_the_fp16_scaler_mostly_skipped_stops_the_run(tiny_cfg):
    """Gradients not finite at every step with a finite loss: each step skipped, the scale halving towards 0, the
    weights unmoved, and nothing said (the loss check passed). The epoch's skipped share is recorded, and an epoch
    skipped over half stops as a diverged one does, naming the dtype to take."""
    from engine.config import apply_overrides
    from engine.train import Diverged, build_run, train_epoch

    cfg = apply_overrides(tiny_cfg, ["perf.dtype=fp16", "attack.num_steps=1", "data.synthetic_size=128",
                                     "train.batch_size=8", "method.balance_images=8"])  # fmt: skip
    run = build_run(cfg)
    run.nets.raw.linear.bias.register_hook(lambda g: g * float("nan"))
    with pytest.raises(Diverged, match="fp16's loss scaler skipped 100% of epoch 1's steps.*perf.dtype=fp32"):
        train_epoch(run, 1)  # 16 steps, all skipped


def test_the_scale_s_first_skips_in_a_short_epoch_are_no_divergence():
    """The scale starts at 2^16 and backs off over its first steps: 5 of an 8-step epoch (the smoke recipe on a T4)
    stopped a healthy run. A share over half counts from 16 skipped steps on; a scale under 2^-24 always."""
    from engine.train import Diverged, check_scaler

    check_scaler({"scaler_skipped": 5 / 8, "loss_scale": 2048.0}, 1, 8)
    with pytest.raises(Diverged):
        check_scaler({"scaler_skipped": 0.8, "loss_scale": 1.0}, 1, 20)
    with pytest.raises(Diverged):
        check_scaler({"scaler_skipped": 0.1, "loss_scale": 2.0**-30}, 1, 8)


def test_a_checkpoint_without_a_momentum_buffer_resumes_under_fused_sgd(tiny_cfg):
    """An older engine's optimizer state has no buffer for a parameter that had no gradient yet: loaded, fused SGD
    took the mixed list (TypeError: expected Tensor ... got NoneType). Buffers are made for those after loading."""
    from engine.train import build_optimizer, seed_momentum

    a, b = torch.nn.Parameter(torch.ones(8)), torch.nn.Parameter(torch.ones(8))
    old = torch.optim.SGD([a, b], lr=0.1, momentum=0.9)
    a.grad = torch.ones(8)
    old.step()  # b: no buffer
    optimizer = build_optimizer([a, b], tiny_cfg, torch.device("cuda"))  # fused
    optimizer.load_state_dict(old.state_dict())
    seed_momentum(optimizer)  # as Run.load_state_dict does (below)
    a.grad, b.grad = torch.ones(8), torch.ones(8)
    optimizer.step()
    assert torch.isfinite(b).all() and not torch.equal(b, torch.ones(8))
    from engine.train import build_run

    state = build_run(tiny_cfg).state_dict()
    saved = state["optimizer"]["state"]
    del saved[next(iter(saved))]["momentum_buffer"]
    run = build_run(tiny_cfg)
    run.load_state_dict(state)
    assert all("momentum_buffer" in s for s in run.optimizer.state.values())


def test_fp16_set_on_a_cpu_is_said_to_be_slow():
    from engine.perf import resolve_dtype

    dtype, why = resolve_dtype("fp16", torch.device("cpu"))
    assert dtype == torch.float16 and "WARNING: CPUs compute fp16 autocast slowly" in why


def test_an_older_engine_s_run_with_settings_refused_today_says_it_cannot_be_resumed(tiny_cfg, tmp_path):
    """helper-118: settings older engines took (attack.official_quirk with another start, model.width on a
    WRN-34-10) are refused today; on a resume the message said to change config.json, and the change was then
    refused as a change to what the run trains. Now it says the run cannot be resumed, and what still reads it."""
    from engine.config import ConfigError
    from engine.train import CHECKPOINT_KEYS, load_checkpoint

    run = tmp_path / "old"
    (run / "checkpoints").mkdir(parents=True)
    cfg = apply_overrides(tiny_cfg, ["attack.official_quirk=true", "attack.start=none"])
    for trained, said in ((cfg, "cannot be resumed; `arat eval .*` and `arat export` still read it"),
                          (tiny_cfg, r"leave attack.start=uniform$")):  # fmt: skip
        # the checkpoint's config: an older engine's that started so, or today's (config.json edited since)
        torch.save(dict.fromkeys(CHECKPOINT_KEYS, 0) | {"config": trained.to_dict()}, run / "checkpoints" / "latest.pt")
        with pytest.raises(ConfigError, match=said):
            run_training(cfg, run, resume=True)
    torch.save({"model": {}, "rng_cpu": torch.zeros(3, dtype=torch.uint8)}, run / "first.pt")  # 2026-11's layout
    with pytest.raises(Exception, match="written by an older version of this engine"):
        load_checkpoint(run / "first.pt")


def test_ranks_that_see_the_run_s_checkpoint_differently_are_refused_alike(tmp_path, monkeypatch):
    """Each rank decided to resume on its own view of checkpoints/latest.pt: a node without the run's folder trained
    from epoch 1 beside ranks resuming, and the run hung in its first collective. The views are gathered (stood in
    here: rank 0 finds it, rank 1 does not) and refused on every rank in one line; equal views go on."""
    from engine import distributed
    from engine.distributed import DistInfo
    from engine.rundir import LATEST, RunDir, RunDirError
    from engine.train import same_checkpoint_view

    rundir = RunDir(tmp_path)
    rundir.checkpoints.mkdir()
    rundir.checkpoint(LATEST).write_bytes(b"x")
    info = DistInfo(rank=0, world_size=2)
    monkeypatch.setattr(distributed, "gather_objects", lambda seen, info: [seen, (True, False)])
    with pytest.raises(RunDirError, match=r"rank 0 finds .*latest.pt, rank 1 does not: every rank of a resume"):
        same_checkpoint_view(rundir, True, info)
    monkeypatch.setattr(distributed, "gather_objects", lambda seen, info: [seen, (True, True)])
    same_checkpoint_view(rundir, True, info)
    same_checkpoint_view(rundir, True, DistInfo())  # one process: nothing to compare
    # `arat train --recipe X --out RUN` again: a rank that finds RUN/config.json continues it, one that does not
    # (another node's folder) would start it afresh beside it
    monkeypatch.setattr(distributed, "gather_objects", lambda seen, info: [seen, (False, False)])
    with pytest.raises(RunDirError, match=r"rank 0 continues .*, rank 1 starts it \(one finds its config.json"):
        same_checkpoint_view(rundir, True, info)
    monkeypatch.setattr(distributed, "gather_objects", lambda seen, info: [seen, (False, False)])
    same_checkpoint_view(rundir, False, info)  # every rank starts afresh: nothing to say


def test_ranks_whose_devices_resolve_other_precisions_are_refused_alike(monkeypatch):
    """perf.dtype auto is each rank's own: a GPU without bf16 beside GPUs with it trained fp16 beside bf16 (the
    scaler's skipped steps apart, then a hang in the epoch's metrics). Gathered (stood in here) and refused."""
    from types import SimpleNamespace

    from engine import distributed
    from engine.config import ConfigError
    from engine.distributed import DistInfo
    from engine.train import same_precision_on_every_rank

    switches = SimpleNamespace(resolved=lambda: {"dtype": "bf16"}, dtype_reason="the GPU runs bf16 natively")
    info = DistInfo(rank=0, world_size=2)
    other = ("fp16", "no bf16 on this GPU")
    monkeypatch.setattr(distributed, "gather_objects", lambda mine, info: [mine, other])
    with pytest.raises(ConfigError, match=r"rank 0 bf16: .*rank 1 fp16: no bf16 on this GPU\): set perf.dtype"):
        same_precision_on_every_rank(switches, info)
    monkeypatch.setattr(distributed, "gather_objects", lambda mine, info: [mine, mine])
    same_precision_on_every_rank(switches, info)


@pytest.mark.parametrize("family", ["at", "trades", "mart", "lbgat", "swa"])
def test_every_method_resumed_after_an_epoch_ends_as_the_uninterrupted_run(family, tmp_path, monkeypatch):
    """What each method keeps between epochs is in its checkpoint: stopped after epoch 1 of 3 and resumed, the run
    ends with the uninterrupted one's weights, method state (LBGAT's clean model, whose momentum the optimizer's
    state holds too) and rows. AR-AT's (test_resume_gives_identical_results) and ARREST's across its stage
    boundary (tests/test_methods_arrest.py) have their own; SWA here averages across the stop."""
    from test_compile import FAMILIES, SHAPE

    from engine.recipes import get_recipe
    from engine.train import load_run_config

    recipe, overrides = FAMILIES[family]
    shape = [o for o in SHAPE if not o.startswith(("train.epochs", "perf.compile_backend", "eval."))]
    cfg = apply_overrides(get_recipe(recipe), [*shape, *overrides, "train.epochs=3", "perf.compile=off"])
    full = run_training(cfg, tmp_path / "full", evaluate_at_end=False)
    import engine.train

    train_epoch = engine.train.train_epoch

    def stopped_in_epoch_2(run, epoch, *args, **kwargs):
        if epoch == 2:
            raise KeyboardInterrupt  # (Ctrl-C: epoch 1's checkpoint is on disk)
        return train_epoch(run, epoch, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(engine.train, "train_epoch", stopped_in_epoch_2)
        with pytest.raises(KeyboardInterrupt):
            run_training(cfg, tmp_path / "resumed", evaluate_at_end=False)
    partial = tmp_path / "resumed"
    resumed = run_training(load_run_config(partial), partial, resume=True, evaluate_at_end=False)
    drop = ("epoch_seconds", "images_per_s", "tflop_per_s", "wall_seconds")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in drop} for r in rows]  # noqa: E731
    assert strip(read_rows(full)) == strip(read_rows(resumed))
    a, b = (torch.load(run / "checkpoints" / "final.pt") for run in (full, resumed))
    for part in ("model", "method"):
        assert a[part].keys() == b[part].keys() and all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part


def test_a_resume_where_a_rank_reads_another_epoch_s_checkpoint_is_refused(tiny_cfg, tmp_path, monkeypatch):
    """Every rank finding checkpoints/latest.pt is not enough: a node's stale copy of the run's folder resumed its
    ranks at another epoch than rank 0's, and the run hung at its end. The resumed epochs are gathered (a second
    rank stood in, one epoch behind) and refused in one line, nothing written."""
    from engine import distributed
    from engine.rundir import RunDirError
    from engine.train import load_run_config

    run = run_training(apply_overrides(tiny_cfg, ["train.epochs=1"]), tmp_path / "run", evaluate_at_end=False)
    (run / "checkpoints" / "final.pt").unlink()
    (run / "config.json").write_text(json.dumps(json.loads((run / "config.json").read_text()) | {"epochs": 2}))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    gather = distributed.gather_objects

    def with_a_stale_rank(obj, info, wait=None):
        mine = gather(obj, info, wait)
        return mine + [obj - 1] if type(obj) is int else mine + mine

    monkeypatch.setattr(distributed, "gather_objects", with_a_stale_rank)
    with pytest.raises(RunDirError, match=r"rank 0 resumes .* after epoch 1, rank 1 after epoch 0 \(its node holds"):
        run_training(load_run_config(run), run, resume=True, evaluate_at_end=False)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_runs_in_one_process_leave_no_switch_behind(tiny_cfg, tmp_path):
    """helper-154, the engine as a library (a notebook, a sweep): a perf.deterministic run left deterministic
    algorithms on for the next run, whose env.json said off; run_training resolved the caller's config's
    perf.device in place (`auto` became `cpu`); an uncompiled grad-sim run switched off Inductor's caches and
    dropped the process's compiled functions; every run's compiled roles stayed on their shared code objects, until
    a later configuration's ran uncompiled (dynamo's per-code limit)."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    from engine.perf import ROLES

    base = apply_overrides(tiny_cfg, ["train.epochs=1"])
    try:
        run_training(apply_overrides(base, ["perf.deterministic=true"]), tmp_path / "det", evaluate_at_end=False)
        assert torch.are_deterministic_algorithms_enabled()  # (the run's own: on while it is the last one)
        cfg = apply_overrides(base, ["perf.device=auto"])
        run_training(cfg, tmp_path / "plain", evaluate_at_end=False)
        assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
        assert json.loads((tmp_path / "plain" / "env.json").read_text())["perf"]["deterministic"] is False
        assert cfg.perf.device == "auto"
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
    before = (functorch_config.donated_buffer, inductor_config.force_disable_caches, inductor_config.fx_graph_cache)
    run_training(apply_overrides(base, ["analysis.grad_sim=true"]), tmp_path / "gs", evaluate_at_end=False)
    assert (functorch_config.donated_buffer, inductor_config.force_disable_caches,
            inductor_config.fx_graph_cache) == before  # fmt: skip
    entries = torch._C._dynamo.eval_frame._debug_get_cache_entry_list
    compiled = apply_overrides(base, ["perf.compile=on", "perf.compile_backend=eager", "eval.attacks=clean",
                                      "eval.num_examples=16"])  # fmt: skip
    run_training(compiled, tmp_path / "compiled")
    row = json.loads((tmp_path / "compiled" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["compile"]["graphs"] > 0
    # (helper-156) the compiling epoch's rate leaves its first step out: above the whole epoch's 256 images / seconds
    assert row["first_step_seconds"] > 0 and row["images_per_s"] > 256 / row["epoch_seconds"] * 1.05, row
    assert all(not entries(kind.forward.__code__) for kind in ROLES)
