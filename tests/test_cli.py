import hashlib
import io
import json
import os
import pickle
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hostile import RunsCode

from engine.cli import main
from engine.config import ModelConfig
from engine.models import build_model
from engine.rundir import RunDir


def run_cli(capsys, *args):
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--recipe", "nope"], "unknown recipe"),
        (["train", "--recipe", "smoke", "--set", "train.epochs=x"], "expected an int"),
        (["train", "--recipe", "smoke", "--set", "model.nope=1"], "unknown key"),
        (["train", "--recipe", "arat-resnet18-cifar10", "--data-dir", "/nonexistent"], "arat data download"),
        (["train"], "--recipe"),
        (["eval", "/nonexistent.pt"], "no such"),
        (["export", "/nonexistent", "out.pt"], "no such"),
    ],
)
def test_bad_input_is_one_line(capsys, args, message):
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_corrupt_and_mismatched_checkpoints(capsys, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    code, _, err = run_cli(capsys, "eval", str(bad), "--model", "resnet18")
    assert code == 2 and "corrupt" in err
    wrong = tmp_path / "wrong.pt"
    torch.save(build_model(ModelConfig(width=8, split_bn=False), 10).state_dict(), wrong)
    code, _, err = run_cli(capsys, "eval", str(wrong), "--model", "wrn34-10")
    assert code == 2 and "does not fit" in err
    unnamed = tmp_path / "unnamed.pt"  # an engine network names itself (an export); other weights need --model
    torch.save({"features.0.weight": torch.zeros(1)}, unnamed)
    code, _, err = run_cli(capsys, "eval", str(unnamed))
    assert code == 2 and "--model" in err


def test_weights_for_another_class_count_say_so(capsys, tmp_path):
    """helper-115: a 100-class file evaluated with --model (the dataset then defaults to CIFAR-10) was refused as a
    wrong --model / --width, which were right (as was ARREST's --init from a run on the other dataset); the
    classifier's output count alone differing names the dataset."""
    from engine.models import CheckpointError, load_plain

    weights = tmp_path / "c100.pt"
    torch.save(build_model(ModelConfig(width=8, split_bn=False), 100).state_dict(), weights)
    code, _, err = run_cli(capsys, "eval", str(weights), "--model", "resnet18", "--width", "8", "--attacks", "clean")
    assert code == 2 and "classifies into 100 classes, this network into 10" in err and "--dataset" in err
    with pytest.raises(CheckpointError, match="classifies into 100 classes, this network into 10"):
        load_plain(build_model(ModelConfig(width=8, split_bn=False), 10), torch.load(weights), "w")
    with pytest.raises(CheckpointError, match="check --model"):  # more than the classifier differs: as before
        load_plain(build_model(ModelConfig(width=16, split_bn=False), 100), torch.load(weights), "w")


def test_a_folder_left_by_an_interrupted_start_is_taken(tmp_path):
    """helper-90: a run killed between making its folder and writing its config.json (a torchrun rank failing in
    build_run, a Ctrl-C) left checkpoints/ and .lock, and every later start there was refused as "holds no run"
    (reproduce.sh cannot pick another folder)."""
    from engine.rundir import RunDir

    left = tmp_path / "run"
    (left / "checkpoints").mkdir(parents=True)
    (left / ".lock").write_text("")
    assert not RunDir(left).holds_anything()
    (left / "checkpoints" / "latest.pt").write_bytes(b"")
    assert RunDir(left).holds_anything()


def test_existing_run_dir_is_not_overwritten(capsys, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "train", "--recipe", "smoke", "--out", str(out))
    assert code == 2 and "is not empty and holds no run" in err and (out / "keep.txt").read_text() == "mine"
    (out / "config.json").write_text("{}")  # a run's folder: resuming is the advice
    code, _, err = run_cli(capsys, "train", "--recipe", "smoke", "--out", str(out))
    assert code == 2 and "--resume" in err and (out / "keep.txt").read_text() == "mine"


def test_train_eval_export_round_trip(capsys, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--recipe", "smoke", "--out", str(run), "--set", "train.epochs=1", "--no-eval"]) == 0
    assert main(["eval", str(run), "--attacks", "clean,pgd20", "--num-examples", "32"]) == 0
    assert "PGD-20" in capsys.readouterr().out and (run / "eval.json").exists()
    (record,) = (run / "eval" / "records").glob("*.json")  # issue 10 item 5: versions and hardware per evaluation
    entry = json.loads(record.read_text())
    assert entry["target"] == str(run.resolve()) and set(entry["results"]) == {"clean", "pgd20"}
    env = entry["environment"]
    assert env["torch"] == torch.__version__ and env["world_size"] == 1 and env["device_type"] == "cpu"
    assert {"pyautoattack", "cpu", "device", "python", "git_commit"} <= set(env)
    assert entry["results"]["pgd20"]["num_examples"] == 32 and "images_per_s" in entry["results"]["pgd20"]
    assert main(["export", str(run), str(tmp_path / "plain.pt")]) == 0
    plain = torch.load(tmp_path / "plain.pt")
    assert not any(".clean." in k or ".adv." in k for k in plain)
    capsys.readouterr()
    no_data = ["--attacks", "clean", "--dataset", "cifar10", "--data-dir", str(tmp_path / "nodata")]
    assert main(["eval", str(tmp_path / "plain.pt"), "--model", "resnet18", "--width", "8", *no_data]) == 2
    assert "arat data download" in one_line_error(capsys)  # no data: says how to get it
    assert main(["recipes"]) == 0 and "arat-wrn34-10-cifar10" in capsys.readouterr().out


def test_an_exported_network_is_evaluated_without_naming_it(capsys, tmp_path):
    """helper-84: `arat eval OUT.pt` of an exported network needed --model (and --dataset for CIFAR-100, else a
    message about --model/--width): its weights name the network (engine.hub.infer_config) and the model_info beside
    it, or its class count, the dataset."""
    from engine.config import ModelConfig
    from engine.models import build_model

    net = build_model(ModelConfig(arch="resnet18", width=8, split_bn=False), 100)
    torch.save(net.state_dict(), tmp_path / "net.pt")
    no_data = ["--attacks", "clean", "--data-dir", str(tmp_path / "nodata")]
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "net.pt"), *no_data]) == 2
    assert "cifar-100" in one_line_error(capsys).lower()  # the network built (100 classes): the data is what is missing
    (tmp_path / "net.json").write_text(json.dumps({"dataset": "cifar10"}))  # what its export said wins
    assert main(["eval", str(tmp_path / "net.pt"), *no_data]) == 2
    told = "error: cifar10 (the run's or its model_info's): 10 classes, but the network has 100 outputs"
    assert told in one_line_error(capsys)  # not "--dataset None"
    torch.save({"w": torch.zeros(1)}, tmp_path / "other.pt")
    assert main(["eval", str(tmp_path / "other.pt"), *no_data]) == 2 and "--model" in one_line_error(capsys)
    assert main(["export", str(tmp_path / "net.pt"), str(tmp_path / "again.pt")]) == 0  # model_info said cifar10
    assert json.loads((tmp_path / "again.json").read_text())["dataset"] == "cifar100"


def test_a_run_on_synthetic_stand_in_data_records_it(capsys, tmp_path):
    """The demo's fallback (real CIFAR-10 absent): results.json, eval.json, model_info and the table say synthetic,
    so the run is never shown as CIFAR-10 beside the paper's numbers."""
    import json

    run, empty = tmp_path / "run", tmp_path / "no-data"
    empty.mkdir()
    fallback = ["--set", "data.dataset=cifar10", "--set", "data.synthetic_fallback=true", "--data-dir", str(empty)]
    args = ["train", "--recipe", "smoke", "--out", str(run), "--set", "train.epochs=1", "--set", "eval.attacks=clean"]
    assert main(args + fallback) == 0
    assert json.loads((run / "config.json").read_text())["data"]["dataset"] == "cifar10"  # as configured
    assert json.loads((run / "results.json").read_text())["dataset"] == "synthetic"  # as used
    env = json.loads((run / "env.json").read_text())
    assert env["dataset"] == "synthetic" and env["world_size"] == 1  # written when training starts
    assert main(["eval", str(run), "--attacks", "clean", "--num-examples", "16", "--data-dir", str(empty)]) == 0
    assert json.loads((run / "eval.json").read_text())["dataset"] == "synthetic"
    assert main(["export", str(run), str(tmp_path / "plain.pt")]) == 0
    assert json.loads((tmp_path / "plain.json").read_text())["dataset"] == "synthetic"
    capsys.readouterr()
    assert main(["table", str(run)]) == 0
    printed = capsys.readouterr().out
    assert "### synthetic" in printed and "CIFAR-10" not in printed and "seed paper" not in printed
    # a later evaluation on real CIFAR-10 (data downloaded since) is not the training data's: export leaves it out
    on_real = {"dataset": "cifar10", "results": {"clean": {"accuracy": 0.99, "num_examples": 10}}}
    (run / "eval.json").write_text(json.dumps(on_real))
    assert main(["export", str(run), str(tmp_path / "again.pt")]) == 0
    info = json.loads((tmp_path / "again.json").read_text())
    trained = json.loads((run / "results.json").read_text())["results"]["clean"]["accuracy"]
    assert info["dataset"] == "synthetic" and info["clean_acc"] == f"{100 * trained:.2f}"  # the synthetic figure


def fake_cifar_archive(path):
    """A tiny archive in the official layout (the real one needs a network)."""
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as tar:
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        for name in names:
            batch = {b"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8), b"labels": list(range(10))}
            blob = pickle.dumps(batch)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_data_download_verifies_md5(capsys, tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    md5 = fake_cifar_archive(archive)
    code, _, err = run_cli(capsys, "data", "download", "--data-dir", str(tmp_path / "d1"), "--url", archive.as_uri())
    assert code == 2 and "does not match the expected" in err  # the published MD5 is of the real archive
    assert "not the official archive" in err and not (tmp_path / "d1").exists()  # no empty folder left behind
    assert not (tmp_path / "d1" / "cifar-10-batches-py").exists()
    code, out, _ = run_cli(
        capsys, "data", "download", "--data-dir", str(tmp_path / "d2"), "--url", archive.as_uri(), "--md5", md5
    )
    assert code == 0 and (tmp_path / "d2" / "cifar-10-batches-py" / "test_batch").exists()
    from engine.data import load_split

    assert load_split("cifar10", tmp_path / "d2", train=True).images.shape == (50, 32, 32, 3)


def test_refusals_that_used_to_pass_silently(tmp_path, capsys):
    from engine.cli import main

    assert main(["train", "--recipe", "smoke", "--out", ""]) == 2
    assert "--out is empty" in capsys.readouterr().err
    assert main(["train", "--recipe", "smoke", "--set", "eval.attacks=", "--out", str(tmp_path / "r")]) == 2
    assert "eval.attacks is empty" in capsys.readouterr().err
    assert main(["train", "--recipe", "smoke", "--set", "attack.eps=8/0", "--out", str(tmp_path / "r")]) == 2
    assert "attack.eps" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_an_unfinished_run_points_to_waiting_or_resuming(tmp_path, capsys):
    from engine.cli import main
    from engine.recipes import get_recipe

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    get_recipe("smoke").save(run / "config.json")
    for argv in (["eval", str(run)], ["table", str(run)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "--resume" in err and "train it first" not in err and "evaluate it with" not in err


def test_eval_refuses_zero_examples(tmp_path, capsys):
    from engine.cli import main

    assert main(["eval", str(tmp_path / "missing.pt"), "--num-examples", "0"]) == 2
    assert "--num-examples 0: give at least 1" in capsys.readouterr().err  # the flag typed, not the config key
    assert main(["eval", str(tmp_path / "missing.pt"), "--chunk-size", "-5"]) == 2
    assert "--chunk-size -5: give at least 0 (0: sized for the device)" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing.pt"), "--attacks", ""]) == 2
    assert "eval.attacks is empty" in capsys.readouterr().err


def one_line_error(capsys) -> str:
    """The error output of the call just made: one line, no traceback."""
    err = capsys.readouterr().err.strip()
    assert err.startswith("arat: error:") and "\n" not in err and "Traceback" not in err, err
    return err


def test_corrupt_or_edited_resume_state_is_one_line(tmp_path, capsys):
    import json

    from engine.cli import main

    run = tmp_path / "run"
    assert main(["train", "--recipe", "smoke", "--set", "train.epochs=1", "--no-eval", "--out", str(run)]) == 0
    capsys.readouterr()
    (run / "checkpoints" / "final.pt").unlink()
    config = json.loads((run / "config.json").read_text())
    edits = {  # (edit, what the line must say)
        "width changed": (lambda c: c["model"].update(width=16), "model.width (16) is not the checkpoint's (8)"),
        "unknown key": (lambda c: c["model"].update(colour="red"), "colour"),
    }
    for what, (edit, said) in edits.items():
        edited = json.loads(json.dumps(config))
        edit(edited)
        (run / "config.json").write_text(json.dumps(edited))
        assert main(["train", "--resume", str(run)]) == 2, what
        assert said in one_line_error(capsys), what
    (run / "config.json").write_text("{not json")
    assert main(["train", "--resume", str(run)]) == 2
    assert "config.json" in one_line_error(capsys)
    (run / "config.json").write_text(json.dumps(config))
    latest = run / "checkpoints" / "latest.pt"
    whole = latest.read_bytes()
    latest.write_bytes(whole[:1000])  # truncated
    before = {name: (run / name).read_bytes() for name in ("config.json", "env.json")}
    assert main(["train", "--resume", str(run), "--set", "dist.timeout_min=7"]) == 2
    assert "not a readable checkpoint" in (said := one_line_error(capsys)) and "copy it again" in said
    assert {name: (run / name).read_bytes() for name in before} == before  # "left as it was": config.json too
    # gone, while metrics.jsonl says the run trained: refused, and the rows kept (a restart from epoch 1 emptied
    # them and said the run had no checkpoint yet)
    latest.unlink()
    rows = json.dumps({"epoch": 1}) + "\n" + json.dumps({"epoch": 2}) + "\n"
    (run / "metrics.jsonl").write_text(rows)
    assert main(["train", "--resume", str(run)]) == 2
    assert "trained 2 epochs (metrics.jsonl) but has no checkpoints/latest.pt" in one_line_error(capsys)
    assert (run / "metrics.jsonl").read_text() == rows
    (run / "checkpoints" / "final.pt").write_bytes(b"")  # finished, latest.pt deleted to save disk
    assert main(["train", "--resume", str(run)]) == 2
    assert f"`arat eval {run}` evaluates it" in one_line_error(capsys)


def test_a_corrupt_final_checkpoint_names_the_resume_that_writes_it_again(tmp_path, capsys):
    from engine.cli import main

    run = tmp_path / "run"
    assert main(["train", "--recipe", "smoke", "--set", "train.epochs=1", "--no-eval", "--out", str(run)]) == 0
    final = run / "checkpoints" / "final.pt"
    whole = final.read_bytes()
    final.write_bytes(whole[:1000])
    capsys.readouterr()
    assert main(["eval", str(run), "--attacks", "clean", "--num-examples", "16"]) == 2
    assert f"delete it, then `arat train --resume {run}` writes it again" in one_line_error(capsys)
    final.unlink()
    assert main(["train", "--resume", str(run), "--no-eval"]) == 0  # no epoch trained: the final network again
    again = torch.load(final, weights_only=True)["model"]
    before = torch.load(io.BytesIO(whole), weights_only=True)["model"]
    assert again.keys() == before.keys() and all(torch.equal(again[k], before[k]) for k in before)


def test_unwritable_output_is_one_line(tmp_path, capsys):
    import os

    from engine.cli import main

    if os.geteuid() == 0:
        target = "/proc/arat-cannot-write-here"  # root ignores permission bits; /proc refuses everyone
    else:
        (tmp_path / "ro").mkdir(mode=0o500)
        target = str(tmp_path / "ro" / "run")
    assert main(["train", "--recipe", "smoke", "--out", target]) == 2
    one_line_error(capsys)


def test_crafted_checkpoints_run_no_code_in_eval_and_export(tmp_path, capsys):
    import torch

    from engine.cli import main

    marker, crafted = tmp_path / "pwned", tmp_path / "crafted.pt"
    torch.save({"model": RunsCode(marker)}, crafted)
    assert main(["eval", str(crafted), "--model", "resnet18", "--attacks", "clean"]) == 2
    assert re.search(
        r"holds an object of \S*open beside its weights, which this engine does not load", one_line_error(capsys)
    )
    assert main(["export", str(crafted), str(tmp_path / "out.pt")]) == 2
    assert "does not load (loading it runs code" in one_line_error(capsys) and not marker.exists()


def no_data(tmp_path) -> list[str]:
    """`arat eval` flags that reach past reading the network to data that is not there."""
    return ["--dataset", "cifar10", "--data-dir", str(tmp_path / "nodata")]


def test_other_tools_checkpoints_are_read_where_they_hold_only_data(tmp_path, capsys):
    """helper-150: most training codes save their weights under "state_dict" (RobustBench's loader), "net"
    (pytorch-cifar) or "model_state_dict", beside an argparse.Namespace of options and numpy numbers; weights_only
    refused those objects, said as a corrupt file, and the nested weights as "not a state_dict". A
    `torch.compile(DDP(model))` state_dict's `_orig_mod.module.` prefix was not taken off. Objects of other code stay
    refused, named, with the way to save the weights alone."""
    import argparse

    from engine.models import CheckpointError, read_weights

    weights = _weights()
    for key in ("state_dict", "net", "model_state_dict"):
        path = tmp_path / f"{key}.pt"
        extra = {"args": argparse.Namespace(lr=0.1, arch="resnet18"), "epoch": np.int64(3), "acc": np.float64(0.5),
                 "history": np.arange(4, dtype=np.float32)}  # fmt: skip
        torch.save({key: {f"_orig_mod.module.{k}": v for k, v in weights.items()}, **extra}, path)
        state, config = read_weights(path)
        assert config is None and state.keys() == {f"_orig_mod.module.{k}" for k in weights}, key
        # no data there: the network was read and built (before the data is looked for), the data is what is missing
        assert main(["eval", str(path), "--attacks", "clean", *no_data(tmp_path)]) == 2, key
        assert "arat data download" in one_line_error(capsys), key
    for nested in ("net", "model"):  # the re-save line the message gives reaches the weights of either layout
        torch.save({nested: weights, "payload": RunsCode(tmp_path / "pwned")}, tmp_path / "nested.pt")
        with pytest.raises(CheckpointError) as refused:
            read_weights(tmp_path / "nested.pt")
        resave = shlex.split(re.search(r"alone: (python -c .*), then use weights.pt", str(refused.value)).group(1))[2]
        subprocess.run(
            [sys.executable, "-c", resave.replace("weights.pt", str(tmp_path / "w.pt"))], check=True, cwd=tmp_path
        )  # fmt: skip  (the file is trusted here: this test wrote it)
        assert read_weights(tmp_path / "w.pt")[0].keys() == weights.keys(), nested
        (tmp_path / "pwned").unlink()
    (tmp_path / "html.pt").write_bytes(b"<html><body>404 Not Found</body></html>")  # a broken download: no object
    with pytest.raises(CheckpointError, match="is not a readable checkpoint .*corrupt or not a PyTorch file"):
        read_weights(tmp_path / "html.pt")
    marker = tmp_path / "pwned"
    torch.save({"state_dict": weights, "payload": RunsCode(marker)}, tmp_path / "code.pt")
    with pytest.raises(CheckpointError, match=r"holds an object of \S*open beside .* weights_only=False"):
        read_weights(tmp_path / "code.pt")
    assert not marker.exists()


def test_a_split_bn_state_dict_saved_alone_is_evaluated_and_a_plain_export_is_checked(tmp_path, capsys):
    """helper-150: `arat eval` of a Split-BN state_dict saved alone (a run's checkpoint["model"]) inferred the network
    from its adv BNs, then loaded the Split-BN names into the plain network: "does not fit this model", where
    `engine.hub.load_model` read it. `arat export` of a plain file wrote it without loading it (a file missing
    layers exported, labelled ResNet-18, failing only in load_model)."""
    from engine.hub import load_model

    split = build_model(ModelConfig(width=8), 10).state_dict()
    assert any(".adv." in k for k in split)
    torch.save(split, tmp_path / "split.pt")
    load_model(tmp_path / "split.pt")
    assert main(["eval", str(tmp_path / "split.pt"), "--attacks", "clean", *no_data(tmp_path)]) == 2
    assert "arat data download" in one_line_error(capsys)  # past the network: the data is what is missing
    broken = {k: v for k, v in _weights().items() if not k.startswith("layer3.1.")}
    torch.save(broken, tmp_path / "broken.pt")
    assert main(["export", str(tmp_path / "broken.pt"), str(tmp_path / "out.pt")]) == 2
    assert "does not fit this model (missing ['layer3.1." in one_line_error(capsys)
    assert not (tmp_path / "out.pt").exists() and not (tmp_path / "out.json").exists()


def test_an_unfinished_run_s_network_is_named_not_missing(tmp_path):
    """helper-150: `engine.hub.load_model(RUN)` and `arat train --init RUN` of a run still training said
    "final.pt: no such checkpoint"; they name the run's state and its latest checkpoint."""
    from engine.hub import load_model
    from engine.models import CheckpointError, run_network_file

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="holds no network"):
        load_model(run)
    torch.save({"model": _weights()}, run / "checkpoints" / "latest.pt")
    with pytest.raises(CheckpointError, match=r"has not finished .*--resume .*latest\.pt for its last finished"):
        load_model(run)
    (run / "checkpoints" / "latest.pt").rename(run / "checkpoints" / "final.pt")
    assert run_network_file(run) == run / "checkpoints" / "final.pt"
    load_model(run)


def test_model_info_gives_no_resnet_width_for_a_wrn():
    """helper-153: the model_info beside an exported WRN-34-10 said `width: 64`, ResNet-18's default."""
    from engine.cli import model_info

    names = {"fc.weight": torch.zeros(10, 640), "block3.layer.0.conv1.weight": torch.zeros(1)}
    info = model_info(Path("wrn.pt"), None, names)
    assert info["architecture"] == "WideResNet-34-10" and info["engine"]["width"] is None
    assert model_info(Path("rn.pt"), None, _weights())["engine"]["width"] == 8


def _weights(width=8):
    return build_model(ModelConfig(width=width, split_bn=False), 10).state_dict()


@pytest.mark.parametrize(
    "content, message",
    [
        (lambda: torch.zeros(3), "holds a Tensor"),
        (lambda: [torch.zeros(3)], "holds a list"),
        (lambda: {}, "holds an empty dict"),
        (lambda: {"conv1.weight": torch.zeros(3), "epoch": 3}, "not named tensors"),
        (lambda: {"model": _weights(), "config": [1, 2]}, "not a config mapping"),
        (lambda: {"model": _weights(), "config": {"nope": 1}}, "unknown config keys"),
        (lambda: {"model": _weights(), "config": {"model": {"width": "wide"}}}, "model.width='wide' is not a int"),
        (lambda: {"model": _weights(), "config": {"model": {"arch": "resnet18", "depth": 3}}}, "unknown keys"),
        (lambda: {"model": _weights(), "config": {"attack": 5}}, "not a section"),
    ],
)
def test_checkpoints_that_are_not_weights_are_one_line(tmp_path, capsys, content, message):
    """Issue 11 item 12: eval, export and --init read weights through one checker (models.read_weights)."""
    path = tmp_path / "odd.pt"
    torch.save(content(), path)
    calls = [
        ["eval", str(path), "--model", "resnet18", "--width", "8", "--attacks", "clean", "--num-examples", "8"],
        ["export", str(path), str(tmp_path / "out.pt")],
        ["train", "--recipe", "arrest-resnet18-cifar10", "--init", str(path), "--out", str(tmp_path / "run")],
    ]
    for argv in calls if "config" not in str(content()) else calls[:2]:  # --init reads only the weights
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not (tmp_path / "out.pt").exists()


def test_export_onto_a_directory_is_one_line(tmp_path, capsys):
    path = tmp_path / "w.pt"
    torch.save(_weights(), path)
    (tmp_path / "dest").mkdir()
    code, _, err = run_cli(capsys, "export", str(path), str(tmp_path / "dest"))
    assert code == 2 and "is a directory" in err and list((tmp_path / "dest").iterdir()) == []


def test_bad_downloads_and_data_dirs_are_one_line(tmp_path, capsys):
    """Issue 11 item 14: a download that is not a gzip tar; --data-dir that is a file."""
    junk = tmp_path / "cifar-10-python.tar.gz"
    junk.write_text("<html>not found</html>")
    md5 = hashlib.md5(junk.read_bytes()).hexdigest()
    code, _, err = run_cli(capsys, "data", "download", "--data-dir", str(tmp_path / "d"), "--url", junk.as_uri(),
                           "--md5", md5)  # fmt: skip
    errors = [line for line in err.replace("\r", "\n").splitlines() if "error" in line]  # besides the progress bar
    assert code == 2 and len(errors) == 1 and "not a gzip tar archive" in errors[0] and "Traceback" not in err
    assert not (tmp_path / "d").exists()  # the temporary download is gone, and the folder it made for it
    a_file = tmp_path / "file"
    a_file.write_text("x")
    code, _, err = run_cli(capsys, "data", "download", "--data-dir", str(a_file))
    assert code == 2 and "is a file" in err
    code, _, err = run_cli(capsys, "train", "--recipe", "arat-resnet18-cifar10", "--data-dir", str(a_file),
                           "--out", str(tmp_path / "run"))  # fmt: skip
    assert code == 2 and "is a file" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "eval", str(tmp_path), "--device", "nope")
    assert code == 2 and "perf.device='nope'" in err


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("config.json", '{"recipe": "smoke", "mod', "config.json is not valid JSON"),
        ("results.json", '{"results": {"clean": {"accur', "results.json is not valid JSON"),
        ("results.json", "[1, 2]", "holds a JSON list"),
        ("results.json", '{"epochs": 3}', "lack what this engine writes"),
        ("results.json", '{"results": {"clean": 0.5}}', "lack what this engine writes"),
        ("results.json", b"\xff\xfe\x00", "is not valid JSON"),
    ],
)
def test_corrupt_run_files_in_table_are_one_line(tmp_path, capsys, name, text, message):
    from engine.recipes import get_recipe

    run = tmp_path / "run"
    run.mkdir()
    get_recipe("smoke").save(run / "config.json")
    (run / "results.json").write_text('{"results": {"clean": {"accuracy": 0.5, "num_examples": 8}}}')
    (run / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    code, _, err = run_cli(capsys, "table", str(run))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_results_are_printed_before_a_write_that_fails(tmp_path, capsys, monkeypatch):
    """Issue 11 item 13: a full disk after a finished evaluation loses nothing computed."""
    import errno

    from engine.rundir import RunDir

    write_json = RunDir.write_json

    def full_disk(self, name, data, durable=True):
        if name in ("results.json", "eval.json"):
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path / name))
        write_json(self, name, data, durable)

    monkeypatch.setattr(RunDir, "write_json", full_disk)
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "--recipe", "smoke", "--out", str(run), "--set", "train.epochs=1",
                             "--set", "eval.attacks=clean", "--set", "eval.num_examples=16")  # fmt: skip
    assert code == 2 and "results: clean" in out + err and "No space left" in err
    assert (run / "checkpoints" / "final.pt").exists()
    code, out, err = run_cli(capsys, "eval", str(run), "--attacks", "clean", "--num-examples", "16")
    assert code == 2 and re.search(r"clean \d+\.\d+% \(n=16\)", out) and "No space left" in err
    monkeypatch.undo()
    assert run_cli(capsys, "eval", str(run), "--attacks", "clean", "--num-examples", "16")[0] == 0
    code, out, err = run_cli(capsys, "table", str(run), "--out", "/dev/full")  # writing /dev/full: ENOSPC
    assert code == 2 and "| AR-AT | " in out and "No space left" in err and len(err.strip().splitlines()) == 1


def test_train_help_explains_set_and_recipe(capsys):
    """Issue 11 item 21: every option of `arat train --help` says what it takes."""
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "override a config field, repeatable" in text and "required unless --resume" in text


@pytest.mark.parametrize("resume", [False, True])
def test_an_interrupted_training_run_names_its_resume_command(tmp_path, capsys, monkeypatch, resume):
    import engine.train

    def ctrl_c(cfg, out, resume, evaluate_at_end):
        raise KeyboardInterrupt

    from engine.recipes import get_recipe

    monkeypatch.setattr(engine.train, "run_training", ctrl_c)
    monkeypatch.setattr(engine.train, "load_run_config", lambda path: get_recipe("smoke"))  # (--out: the same run)
    out = tmp_path / "run"
    args = ["train", "--resume", str(out)] if resume else ["train", "--recipe", "smoke", "--out", str(out)]
    code, _, err = run_cli(capsys, *args)  # stopped while setting up: no config.json, nothing to resume yet
    assert code == 130 and "the same command starts it again" in err and "--resume" not in err, err
    out.mkdir()
    (out / "config.json").write_text("{}")
    code, _, err = run_cli(capsys, *args)
    assert code == 130 and f"`arat train --resume {out}` continues the run" in err and "Traceback" not in err
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "final.pt").write_bytes(b"")  # trained: stopped in its closing evaluation
    code, _, err = run_cli(capsys, *args)
    assert code == 130 and f"`arat train --resume {out}` finishes the run's evaluation (the chunks it" in err


def test_an_interrupted_evaluation_says_its_chunks_are_kept(capsys, monkeypatch):
    import engine.cli

    def ctrl_c(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(engine.cli.COMMANDS, "eval", ctrl_c)
    code, _, err = run_cli(capsys, "eval", "somewhere")
    assert code == 130 and "skips the chunks already finished" in err


def test_version_names_the_commit_and_the_libraries(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and out.startswith("arat ") and f"torch {torch.__version__}" in out


def test_a_run_configured_with_cuda_graphs_on_evaluates_on_a_cpu(tmp_path, capsys):
    """perf.cuda_graphs=on (a GPU run's choice, refused without CUDA) must not stop `arat eval RUN` on a CPU."""
    import json

    run = tmp_path / "run"
    args = ["train", "--recipe", "smoke", "--out", str(run), "--set", "train.epochs=1", "--set", "eval.attacks=clean"]
    assert main(args) == 0
    config = json.loads((run / "config.json").read_text())
    config["perf"]["cuda_graphs"] = "on"
    (run / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    code, out, err = run_cli(capsys, "eval", str(run), "--attacks", "pgd20", "--num-examples", "8", "--device", "cpu")
    assert code == 0 and "PGD-20" in out, err


def test_a_run_stopped_during_its_final_evaluation_is_evaluated_when_resumed(tmp_path, capsys):
    """A run whose training ended but whose final evaluation did not (results.json missing, one of two chunks
    written) is evaluated by --resume: its final network as saved (final.pt untouched), the finished chunk reused,
    the same flags; a run trained with --no-eval is not evaluated by a resume."""
    import json

    run = tmp_path / "run"
    sets = ["train.epochs=1", "eval.attacks=clean", "eval.num_examples=64", "eval.chunk_size=32", "perf.device=cpu"]
    assert main(["train", "--recipe", "smoke", "--out", str(run), *[a for k in sets for a in ("--set", k)]]) == 0
    first = json.loads((run / "results.json").read_text())["results"]["clean"]
    assert first["chunks"] == 2 and first["reused_chunks"] == 0
    flags = (run / "eval" / "flags.json").read_text()
    (run / "results.json").unlink()  # stopped in the evaluation's second chunk
    (run / "eval" / "flags.json").unlink()
    chunks = sorted((run / "eval" / "chunks").glob("clean-*/0*.json"))  # beside spec.json
    assert len(chunks) == 2
    chunks[1].unlink()
    final = run / "checkpoints" / "final.pt"
    saved = final.read_bytes()
    capsys.readouterr()
    code, out, err = run_cli(capsys, "train", "--resume", str(run))
    assert code == 0 and "its evaluation did not end: evaluating its final network" in out, err
    again = json.loads((run / "results.json").read_text())["results"]["clean"]
    assert again["reused_chunks"] == 1 and again["accuracy"] == first["accuracy"]
    assert (run / "eval" / "flags.json").read_text() == flags and final.read_bytes() == saved

    quiet = tmp_path / "no-eval"
    assert main(["train", "--recipe", "smoke", "--out", str(quiet), "--no-eval", "--set", "train.epochs=1"]) == 0
    capsys.readouterr()
    code, out, err = run_cli(capsys, "train", "--resume", str(quiet))
    assert code == 0 and "finished its 1 epochs already" in out and not (quiet / "results.json").exists(), err


def test_resume_and_export_edge_cases_end_in_one_line(tmp_path, capsys):
    """A finished run resumed says so; --resume keeps config.json's device as asked for (auto), takes --set
    perf.device and --data-dir only, refuses --out; a checkpoint that no longer fits config.json, a config.json that
    is not UTF-8 and a metrics row that is not an object are one line each; export never overwrites its weights with
    their model_info."""
    import json

    run = tmp_path / "run"
    train = ["train", "--recipe", "smoke", "--out", str(run), "--set", "train.epochs=1", "--set", "eval.attacks=clean"]
    assert main(train) == 0
    assert json.loads((run / "config.json").read_text())["perf"]["device"] == "auto"  # resolved again on resume
    capsys.readouterr()
    code, out, err = run_cli(capsys, "train", "--resume", str(run), "--set", "perf.device=cpu")
    assert code == 0 and "finished its 1 epochs already" in out, err
    # a run moved to a machine its explicit switches do not fit changes them on resume (helper-83), kept for the next
    code, out, err = run_cli(capsys, "train", "--resume", str(run), "--set", "perf.cuda_graphs=off", "--set",
                             "dist.timeout_min=60")  # fmt: skip
    assert code == 0, err
    saved = json.loads((run / "config.json").read_text())
    assert (saved["perf"]["cuda_graphs"], saved["dist"]["timeout_min"]) == ("off", 60)
    for extra, message in ((["--out", str(tmp_path / "x")], "drop --out"), (["--set", "optim.lr=1"], "perf.*")):
        code, out, err = run_cli(capsys, "train", "--resume", str(run), *extra)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    code, out, err = run_cli(capsys, "export", str(run), str(tmp_path / "w.json"))
    assert code == 2 and "would overwrite the weights" in err and not (tmp_path / "w.json").exists(), err
    config = json.loads((run / "config.json").read_text())
    broken = tmp_path / "broken"
    for name, edit, message in (
        # what the run trains, against the config its checkpoint trained with (the predictors' 32 keys fit nothing)
        (
            "predictor",
            lambda c: c["method"].update(predictor=False),
            "method.predictor (false) is not the checkpoint's",
        ),
        ("utf8", None, "config.json is not a config this engine wrote"),
        ("metrics", None, "metrics.jsonl line 2 is not a metrics row"),
    ):
        shutil.copytree(run, broken / name)
        (broken / name / "checkpoints" / "final.pt").unlink()  # resume trains on: raise the epochs
        c = json.loads(json.dumps(config)) | {"epochs": 2}
        if edit:
            edit(c)
        (broken / name / "config.json").write_text(json.dumps(c))
        if name == "utf8":
            (broken / name / "config.json").write_bytes(b"\xff\xfe{")
        if name == "metrics":
            with (broken / name / "metrics.jsonl").open("a") as f:
                f.write("[1]\n{}\n")
        code, out, err = run_cli(capsys, "train", "--resume", str(broken / name))
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and len(err) < 400, (name, err)


def test_a_user_s_review_of_the_cli(tmp_path, capsys, monkeypatch):
    """What a review of the CLI as a demanding user found (2026-12-05): each ends in one line and exit 2 before
    anything is written or evaluated, and nothing of a run is overwritten."""
    run = tmp_path / "run"
    small = ["--set", "train.epochs=1", "--set", "eval.num_examples=32"]
    assert main(["train", "--recipe", "smoke", "--out", str(run), *small, "--set", "eval.attacks=clean,pgd20"]) == 0
    config, results = (run / "config.json").read_text(), (run / "results.json").read_text()
    capsys.readouterr()
    # export never replaces a run's files (OUT.json beside OUT.pt was the run's config.json) nor an earlier export
    for out in ("config.pt", "results.pt"):
        assert main(["export", str(run), str(run / out)]) == 2 and "exists" in one_line_error(capsys)
    assert (run / "config.json").read_text() == config and (run / "results.json").read_text() == results
    assert main(["export", str(run), str(tmp_path / "m.pt")]) == 0
    capsys.readouterr()
    assert main(["export", str(run), str(tmp_path / "m.pt")]) == 2 and "remove them first" in one_line_error(capsys)
    # a second `arat eval` of other attacks keeps the first one's in eval.json (and so in the table)
    assert main(["eval", str(run), "--attacks", "clean,pgd20", "--num-examples", "32"]) == 0
    assert main(["eval", str(run), "--attacks", "clean", "--num-examples", "32"]) == 0
    import json

    assert set(json.loads((run / "eval.json").read_text())["results"]) == {"clean", "pgd20"}
    assert main(["eval", str(run), "--attacks", "clean", "--num-examples", "16"]) == 0  # the same weights, fewer
    assert json.loads((run / "eval.json").read_text())["results"]["clean"]["num_examples"] == 32
    capsys.readouterr()
    # table: --out onto a run's file, a directory, an unknown plot format: refused before anything is written
    assert main(["table", str(run), "--out", str(run / "results.json")]) == 2 and "markdown" in one_line_error(capsys)
    assert (run / "results.json").read_text() == results
    assert main(["table", str(run), "--out", str(tmp_path)]) == 2 and "directory" in one_line_error(capsys)
    assert main(["table", str(run), "--plot", str(tmp_path / "p.txt")]) == 2 and ".png" in one_line_error(capsys)
    assert main(["table", str(tmp_path / "nothere")]) == 2 and "does not exist" in one_line_error(capsys)
    # eval: a run in use is refused before evaluating; a dataset of other classes; cuda on a CPU names --device
    from engine.rundir import RunDir

    with RunDir(run).open_for_writing(resume=True):
        assert main(["eval", str(run), "--attacks", "clean", "--num-examples", "32"]) == 2
        err = one_line_error(capsys)
        assert "in use" in err and "final.pt --out DIR" in err  # its final network (an SWA run's latest.pt is not)
        # taken while an evaluation ran: --out's files are its own (written), the run's wait for a rerun
        import engine.cli

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(engine.cli, "writable_now", lambda run: None)
            patch.setattr(engine.cli, "EVAL_LOCK_WAIT_S", 0.5)
            args = ["eval", str(run), "--attacks", "clean", "--num-examples", "32", "--out", str(tmp_path / "apart")]
            assert main(args) == 2
        said = capsys.readouterr().err  # after the evaluation's progress bar
        assert "writes them in seconds" in said and (tmp_path / "apart" / "flags.json").exists()
    assert main(["eval", str(run), "--attacks", "clean", "--dataset", "cifar100"]) == 2
    assert "10 outputs" in one_line_error(capsys)
    if not torch.cuda.is_available():
        assert main(["eval", str(run), "--device", "cuda"]) == 2 and "--device cpu" in one_line_error(capsys)
    # train: an empty --resume; a learning-rate decay or milestone that makes no sense
    assert main(["train", "--resume", ""]) == 2 and "--resume is empty" in one_line_error(capsys)
    for bad in ("optim.decay=-1", "optim.milestones=-5,3"):
        assert main(["train", "--recipe", "smoke", "--set", bad, "--out", str(tmp_path / "x")]) == 2
        assert "optim." in one_line_error(capsys) and not (tmp_path / "x").exists()


def test_a_bad_option_is_one_line_without_the_usage(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["eval", "somewhere", "--num-examples", "abc"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and "invalid int value" in err and "--help" in err


def test_a_local_archive_path_downloads_and_a_partial_folder_is_refused_first(tmp_path, capsys):
    archive = tmp_path / "cifar-10-python.tar.gz"
    md5 = fake_cifar_archive(archive)
    code, _, _ = run_cli(
        capsys, "data", "download", "--data-dir", str(tmp_path / "d"), "--url", str(archive), "--md5", md5
    )
    assert code == 0 and (tmp_path / "d" / "cifar-10-batches-py" / "test_batch").exists()
    partial = tmp_path / "p" / "cifar-10-batches-py"
    partial.mkdir(parents=True)
    code, _, err = run_cli(
        capsys, "data", "download", "--data-dir", str(tmp_path / "p"), "--url", str(archive), "--md5", md5
    )
    assert code == 2 and "incomplete" in err and list(partial.iterdir()) == []
    code, _, err = run_cli(capsys, "data", "download", "--data-dir", str(tmp_path / "q"), "--url", "not a url")
    assert code == 2 and "could not download" in err and "Traceback" not in err


def test_two_downloads_into_one_folder_at_once_leave_one_dataset_folder(tmp_path, capsys, monkeypatch):
    """Two `arat data download` at once: the second's extraction was moved into the first's finished folder
    (cifar-10-batches-py/cifar-10-batches-py/). It now renames its folder into place, or finds the other's there."""
    import engine.data.download as download

    archive = tmp_path / "cifar-10-python.tar.gz"
    md5 = fake_cifar_archive(archive)
    data = tmp_path / "d"
    extract = download.safe_extract

    def and_meanwhile_another_download_ends(archive_path, staging):
        extract(archive_path, staging)
        shutil.copytree(staging / "cifar-10-batches-py", data / "cifar-10-batches-py")

    monkeypatch.setattr(download, "safe_extract", and_meanwhile_another_download_ends)
    code, _, err = run_cli(capsys, "data", "download", "--data-dir", str(data), "--url", str(archive), "--md5", md5)
    assert code == 0, err
    assert sorted(p.name for p in (data / "cifar-10-batches-py").iterdir()) == sorted(
        [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    )
    assert [p.name for p in data.iterdir()] == ["cifar-10-batches-py"]  # the staging folder removed too


def test_sigterm_ends_like_ctrl_c(tmp_path):
    """`timeout`, a scheduler or torchrun stopping `arat train` ended it with no message and no resume line."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "engine.cli", "train", "--recipe", "smoke", "--out", str(run),
           "--set", "train.epochs=50"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    deadline = time.time() + 300
    while not (run / "checkpoints" / "latest.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    if not (run / "checkpoints" / "latest.pt").exists():  # a slow machine: the signal must land in training
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"no checkpoint within 300 s (exit {proc.returncode}): {err[-2000:]}")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and f"arat train --resume {run}" in err  # 128 + SIGTERM, as a shell says it


def test_evaluating_an_unfinished_run_says_so(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--recipe", "smoke", "--out", str(run), "--set", "train.epochs=1", "--no-eval"]) == 0
    (run / "checkpoints" / "final.pt").unlink()  # as a run still in its second epoch
    capsys.readouterr()
    assert main(["eval", str(run), "--attacks", "clean", "--num-examples", "16"]) == 0
    assert f"{run} has not finished: using its latest checkpoint (after epoch 1 of 1)" in capsys.readouterr().err
    # its figures are the latest checkpoint's: `arat table` gives them a row of their own, `arat export` says so
    # (helper-84: a killed seed's epoch-50 figures were averaged into the finished seeds' row, exported as theirs)
    assert main(["table", str(run)]) == 0
    assert "| AR-AT (unfinished: after epoch 1 of 1) |" in capsys.readouterr().out
    assert main(["export", str(run), str(tmp_path / "net.pt")]) == 0
    info = json.loads((tmp_path / "net.json").read_text())
    assert info["footnote"].startswith("an unfinished run's latest checkpoint (after epoch 1 of 1)")
    # stopped between epoch 2's row and its checkpoint: the checkpoint's epoch, not the row's
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"epoch": 2}) + "\n")
    assert RunDir(run).unfinished(3) == "after epoch 1 of 3"


def _last_line(err: str) -> str:
    """The error line after any progress bar's redraws (carriage returns)."""
    line = err.strip().splitlines()[-1].split("\r")[-1]
    assert line.startswith("arat: error:") and "Traceback" not in err, err
    return line


def test_out_of_memory_is_one_line_saying_what_is_kept_and_what_to_do(tmp_path, capsys, monkeypatch):
    """An out-of-memory error was a traceback and exit 1; in the evaluation that ends a run, a resume ran the same
    chunk size into it again (--resume takes no eval.* setting): now one line, exit 2, naming a smaller chunk."""
    import engine.evaluate
    import engine.train

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(engine.evaluate, "_attack_chunk", oom)
        code, _, err = run_cli(capsys, "train", "--recipe", "smoke", "--out", str(run), "--set", "train.epochs=1",
                               "--set", "eval.attacks=clean", "--set", "eval.num_examples=32",
                               "--set", "eval.chunk_size=32")  # fmt: skip
    line = _last_line(err)
    assert code == 2 and "out of memory attacking clean in chunks of 32 images" in line and "--chunk-size 16" in line
    assert (run / "checkpoints" / "final.pt").exists()
    monkeypatch.setattr(engine.train, "train_step", oom)
    code, _, err = run_cli(capsys, "train", "--recipe", "smoke", "--out", str(tmp_path / "other"))
    line = _last_line(err)
    assert code == 2 and "out of memory (CUDA out of memory." in line and "no epoch ended" in line
    assert f"`arat train --resume {tmp_path / 'other'}` starts it again with --set perf.cuda_graphs=off" in line
    # the closing evaluation's chunk size is how it runs, not what the run trains: a resume takes it
    monkeypatch.undo()
    code, _, err = run_cli(capsys, "train", "--resume", str(run), "--set", "eval.chunk_size=16")
    assert code == 0 and json.loads((run / "config.json").read_text())["eval"]["chunk_size"] == 16
    assert (run / "results.json").exists()
    code, _, err = run_cli(capsys, "train", "--resume", str(run), "--set", "dist.sync_bn=true")  # what it trains
    assert code == 2 and "not dist.sync_bn" in err


def test_an_error_chain_that_loops_ends(monkeypatch):
    """Inductor's error keeps the error it wraps as inner_exception; re-raised from the wrapper, the two pointed at
    each other and the walk to the innermost one never ended (every rank at 100% CPU, forever)."""
    from engine.errors import innermost

    class Wrapper(RuntimeError):
        def __init__(self, inner):
            super().__init__("wrapped")
            self.inner_exception = inner

    full = OSError(28, "No space left on device")
    wrapper = Wrapper(full)
    full.__cause__ = wrapper  # `raise inner from wrapper`
    import threading

    found = []  # a walk that never ends fails the test in seconds (a daemon thread: the suite still exits)
    walk = threading.Thread(target=lambda: found.extend([innermost(wrapper), innermost(full)]), daemon=True)
    walk.start()
    walk.join(timeout=10)
    assert len(found) == 2, "the walk along the error chain did not end"
    assert found[0] is full and found[1] is wrapper  # each error once: the walk ends at the last not seen before


@pytest.mark.parametrize(
    "inner, says",
    [
        (OSError(28, "No space left on device", "/tmp/ind/x.py"), "No space left on device"),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "out of memory"),
    ],
)
def test_a_compiled_evaluation_that_runs_out_of_disk_or_memory_says_so(tmp_path, capsys, monkeypatch, inner, says):
    """Not "evaluate without compiling": a full disk under Inductor's cache, or the device's memory, said as such
    (a full disk looped forever before: see above)."""
    import torch._dynamo

    import engine.evaluate

    def failing(*args, **kwargs):
        error = torch._dynamo.exc.TorchDynamoException("backend='inductor' raised")
        error.inner_exception = inner
        raise error

    run = tmp_path / "run"
    assert main(["train", "--recipe", "smoke", "--set", "train.epochs=1", "--no-eval", "--out", str(run)]) == 0
    capsys.readouterr()
    monkeypatch.setattr(engine.evaluate, "_evaluate", failing)
    code, _, err = run_cli(capsys, "eval", str(run), "--attacks", "clean", "--num-examples", "16", "--compile", "on")
    assert code == 2 and says in _last_line(err) and "--compile off" not in err


def test_a_full_disk_under_torch_compile_s_wrapper_is_said_as_a_full_disk(capsys, monkeypatch):
    """torch.compile wraps its backend's errors (BackendCompilerFailed, a RuntimeError): Inductor's cache on a full
    disk was a traceback in training and "evaluate without compiling" in evaluation."""
    import engine.train

    def full(*args, **kwargs):
        raise RuntimeError("backend='inductor' raised") from OSError(28, "No space left on device", "/tmp/ind/x.py")

    monkeypatch.setattr(engine.train, "run_training", full)
    code, _, err = run_cli(capsys, "train", "--recipe", "smoke", "--out", "/tmp/never-made")
    assert code == 2 and "cannot access /tmp/ind/x.py: No space left on device" in _last_line(err)
    monkeypatch.setattr(engine.train, "run_training", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # any other error keeps its traceback
        main(["train", "--recipe", "smoke", "--out", "/tmp/never-made"])


def test_recipes_show_prints_every_key_a_set_takes(capsys):
    """No command listed the keys --set takes (the unknown-key error lists none): --show prints a recipe's resolved
    config, with --set applied."""
    code, out, _ = run_cli(capsys, "recipes", "--show", "arat-resnet18-cifar10", "--set", "train.epochs=7")
    shown = json.loads(out)
    assert code == 0 and shown["train"]["epochs"] == 7 and shown["optim"]["milestones"] == [76, 91]
    # every key as --set names it, set on another recipe (smoke: other data, network, method), gives this config
    from engine.config import apply_overrides
    from engine.recipes import get_recipe

    def as_set(value) -> str:
        if isinstance(value, list):
            return ",".join(map(str, value))
        return str(value).lower() if isinstance(value, bool) else str(value)

    sets = [f"{section}.{key}={as_set(value)}" for section, values in shown.items() for key, value in values.items()]
    rebuilt = json.loads(json.dumps(apply_overrides(get_recipe("smoke"), sets).to_dict()))  # (tuples as lists)
    train = {k: rebuilt.pop(k) for k in list(rebuilt) if not isinstance(rebuilt[k], dict)}
    assert {"train": train} | rebuilt == shown and len(sets) > 50
    assert {"data", "model", "attack", "method", "optim", "swa", "eval", "perf", "dist", "analysis"} <= set(shown)
    code, _, err = run_cli(capsys, "recipes", "--set", "train.epochs=7")
    assert code == 2 and "--set goes with --show NAME" in err


@pytest.fixture(scope="module")
def trained_two_epochs(tmp_path_factory):
    """The smoke recipe trained to its end (2 epochs, lr 0.02 then 0.005), no evaluation: a run to resume."""
    run = tmp_path_factory.mktemp("resume") / "run"
    assert main(["train", "--recipe", "smoke", "--no-eval", "--out", str(run)]) == 0
    return run


def _resumed_with(run, capsys, **edits) -> tuple[int, str, Path]:
    """Resume `run` (a copy) with config.json edited: {"section.key": value} (train.* at the top level), train.epochs
    raised to 3 unless given. The copy's checkpoint and metrics must be untouched when refused."""
    import copy

    work = run.parent / f"copy-{len(list(run.parent.iterdir()))}"
    shutil.copytree(run, work)
    config = json.loads((work / "config.json").read_text())
    edited = copy.deepcopy(config)
    for key, value in ({"train.epochs": 3} | edits).items():
        section, name = key.split(".")
        (edited if section == "train" else edited[section])[name] = value
    (work / "config.json").write_text(json.dumps(edited))
    checkpoint, metrics = (work / "checkpoints" / "latest.pt").read_bytes(), (work / "metrics.jsonl").read_text()
    capsys.readouterr()
    code = main(["train", "--resume", str(work), "--no-eval"])
    err = capsys.readouterr().err.strip()
    if code == 2:
        assert (work / "checkpoints" / "latest.pt").read_bytes() == checkpoint
        assert (work / "metrics.jsonl").read_text() == metrics and json.loads(
            (work / "config.json").read_text()
        ) == edited
    return code, err, work


@pytest.mark.parametrize(
    "edits, says",
    [
        ({"attack.eps": 16 / 255}, "config.json's attack.eps (0.06274509803921569) is not the checkpoint's (0.03137"),
        ({"method.invariance_weight": 0.0}, "method.invariance_weight (0.0)"),
        ({"train.seed": 1}, "config.json's seed (1) is not the checkpoint's (0)"),
        ({"train.batch_size": 16}, "config.json's batch_size (16)"),
        ({"optim.weight_decay": 0.05}, "optim.weight_decay (0.05)"),  # (the optimizer's state kept the old one)
        ({"model.width": 16}, "model.width (16) is not the checkpoint's (8)"),
        ({"data.augment": False}, "data.augment (false)"),
        ({"method.name": "at", "model.split_bn": False}, "model.split_bn (false) is not the checkpoint's (true)"),
        ({"optim.milestones": [3]}, "changes epoch 2's rate (0.005 -> 0.05)"),
        ({"train.epochs": 1}, "config.json's epochs (1) is below the 2 epochs the run trained"),
    ],
)
def test_a_resume_whose_config_json_changes_what_the_run_trains_is_refused(trained_two_epochs, capsys, edits, says):
    """config.json is edited to train a run on (train.epochs raised); any other change to what it trains was taken
    part-way (a run of two configurations under the second's name: eps, the invariance weight, the seed, the batch
    size, a learning rate already passed) or silently ignored while every record claimed it (weight decay: the
    optimizer's state keeps its own). One line, exit 2, the run as it was."""
    code, err, _ = _resumed_with(trained_two_epochs, capsys, **edits)
    assert code == 2 and says in err and "\n" not in err, err


def test_a_resume_takes_what_does_not_change_the_trained_epochs(trained_two_epochs, capsys):
    """Raising train.epochs with a decay past the old end, a method key the method does not read (AR-AT and beta),
    how it runs (perf.*, eval.*): trained on, epoch 3 at the new decay's rate."""
    edits = {"optim.milestones": [1, 2], "method.beta": 3.0, "perf.channels_last": False, "eval.batch_size": 64}
    code, err, work = _resumed_with(trained_two_epochs, capsys, **edits)
    assert code == 0, err
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[-1]["lr"] == pytest.approx(0.0005)


def test_resume_change_names_the_first_key_a_resume_cannot_take():
    """Between single-BN methods nothing else fails to load: AT resumed as TRADES trained on as TRADES (its table
    row then said TRADES). ARREST: its stage length is what it trains, its schedule and replay window by what they
    did to the trained epochs; SWA's start and cadence once it averages; a method key the method reads."""
    from engine.config import apply_overrides, resume_change
    from engine.recipes import get_recipe

    def after(cfg, *sets):
        return apply_overrides(cfg, list(sets))

    at = after(get_recipe("smoke"), "method.name=at", "model.split_bn=false")
    assert "method.name (trades) is not the checkpoint's (at)" in resume_change(at, after(at, "method.name=trades"), 1)
    assert resume_change(at, after(at, "method.beta=3", "train.epochs=5"), 1) is None  # AT reads no beta
    arat = get_recipe("smoke")  # auto-balance on: its fixed weight unread
    assert resume_change(arat, after(arat, "method.fixed_adv_weight=0.9"), 1) is None
    assert "method.auto_balance (false)" in resume_change(arat, after(arat, "method.auto_balance=false"), 1)
    arrest = after(get_recipe("smoke"), "method.name=arrest", "method.pretrain_epochs=4", "train.epochs=8",
                   "method.replay_until=0.5", "optim.milestones=3")  # fmt: skip
    assert "method.pretrain_epochs (5)" in resume_change(arrest, after(arrest, "method.pretrain_epochs=5"), 2)
    assert resume_change(arrest, after(arrest, "optim.milestones=3,4", "method.finetune_milestones=1"), 3) is None
    assert "changes epoch 4's rate" in resume_change(arrest, after(arrest, "optim.milestones=4"), 4)
    assert "changes epoch 5's rate" in resume_change(arrest, after(arrest, "method.finetune_lr=0.5"), 5)
    # fine-tuning epochs 5-8, replay over its first 2; 12 epochs: its first 4 (epochs 7 and 8 already trained)
    assert "noisy-replay window over epoch 7" in resume_change(arrest, after(arrest, "train.epochs=12"), 8)
    assert resume_change(arrest, after(arrest, "train.epochs=12"), 6) is None
    swa = after(get_recipe("smoke"), "swa.enabled=true", "swa.start_epoch=1", "swa.every=2")
    assert "swa.start_epoch (2)" in resume_change(swa, after(swa, "swa.start_epoch=2"), 1)
    late = after(swa, "swa.start_epoch=76", "train.epochs=100")  # nothing averaged yet at epoch 10
    assert resume_change(late, after(late, "swa.start_epoch=60", "swa.every=7"), 10) is None
    assert "swa.start_epoch (5)" in resume_change(late, after(late, "swa.start_epoch=5"), 10)
    off = get_recipe("smoke")  # turned on in config.json: averages from the resume on
    assert resume_change(off, after(off, "swa.enabled=true", "swa.start_epoch=1", "swa.every=2"), 1) is None
    assert "dist.sync_bn (true)" in resume_change(off, after(off, "dist.sync_bn=true"), 1)
    assert resume_change(off, after(off, "dist.timeout_min=5", "perf.dtype=fp32"), 1) is None
    # a key an older engine's checkpoint did not hold is not compared (its default may have changed since)
    assert resume_change(off, after(off, "attack.official_quirk=true"), 1, saved={"attack.eps"}) is None


def test_an_evaluation_on_other_test_images_of_the_same_dataset_is_not_mixed_in(tmp_path, monkeypatch, capsys):
    """`arat eval RUN` reading another copy of the dataset (another --data-dir, or the relative default from another
    working directory: the name is the same) merged its attacks into eval.json beside the training's, and export
    and the table mixed figures from two test sets as one model's (helper-113). Each record now carries its test
    images' fingerprint: such an evaluation replaces eval.json whole and is left out beside results.json."""
    import engine.data

    run = tmp_path / "run"
    assert main(["train", "--recipe", "smoke", "--out", str(run), "--set", "train.epochs=1",
                 "--set", "eval.attacks=clean"]) == 0  # fmt: skip
    trained = json.loads((run / "results.json").read_text())
    load_test_split = engine.data.load_test_split

    def other_copy(cfg, seed, dataset=None):  # the same name, other pixels
        split = load_test_split(cfg, seed, dataset)
        split.images = 255 - split.images
        return split

    monkeypatch.setattr(engine.data, "load_test_split", other_copy)
    assert main(["eval", str(run), "--attacks", "clean,pgd20", "--num-examples", "16"]) == 0
    other = json.loads((run / "eval.json").read_text())
    assert other["test_data"] != trained["test_data"] and set(other["results"]) == {"clean", "pgd20"}
    assert main(["export", str(run), str(tmp_path / "model.pt")]) == 0
    published = json.loads((tmp_path / "model.json").read_text())["engine"]["results"]
    assert set(published) == {"clean"} and published["clean"] == trained["results"]["clean"]  # the training's
    assert "eval.json (synthetic, other test images) left out: the run trained on synthetic" in main_table(run)
    monkeypatch.setattr(engine.data, "load_test_split", load_test_split)  # the training's test images again
    assert main(["eval", str(run), "--attacks", "clean", "--num-examples", "16"]) == 0
    again = json.loads((run / "eval.json").read_text())
    assert again["test_data"] == trained["test_data"] and set(again["results"]) == {"clean"}  # replaced whole
    capsys.readouterr()


def main_table(run) -> str:
    from engine.table import render, table

    return render(table([str(run)]))


def test_stdout_to_a_file_is_written_line_by_line():
    """`nohup arat train ... > log`: stdout to a file or pipe was block-buffered, so the start line waited through
    the first compile and a SIGKILL (out of memory, scancel) lost every line since the last flush. A process killed
    right after printing (os._exit: no flush at exit) still leaves its line."""
    code = (
        "import os\nfrom engine import cli\n"
        "cli.run_command = lambda args: (print('arat: recipe=smoke ...'), os._exit(0))\n"
        "cli.main(['train', '--recipe', 'smoke'])\n"
    )
    repo, env = Path(__file__).resolve().parents[1], {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    done = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout == "arat: recipe=smoke ...\n", done.stderr[-2000:]


def test_an_evaluation_of_a_run_trained_on_meanwhile_is_not_merged_into_it(tmp_path, capsys, monkeypatch):
    """`arat eval RUN` holds no lock while it evaluates, so `arat train --resume RUN` may start and write another
    network meanwhile. Its results, of the network read before, were merged into RUN/eval.json under the new one's
    results.json, and so into `arat table` and `arat export`'s figures: now refused in one line, nothing written
    into the run; evaluated again, they are."""
    import engine.cli
    import engine.evaluate

    run = tmp_path / "run"
    small = ["--set", "train.epochs=1", "--set", "eval.num_examples=16", "--set", "eval.attacks=clean"]
    assert main(["train", "--recipe", "smoke", "--out", str(run), *small]) == 0
    evaluate = engine.evaluate.evaluate
    final = run / "checkpoints" / "final.pt"  # the network `arat eval RUN` reads (a resume trained past the end)

    def and_meanwhile_a_resume_writes(*args, **kwargs):
        results = evaluate(*args, **kwargs)
        fresh = final.with_name("fresh.pt")  # written whole, then renamed over, as the engine's checkpoints are
        fresh.write_bytes(final.read_bytes())
        os.replace(fresh, final)
        return results

    flags, records = run / "eval" / "flags.json", run / "eval" / "records"
    before = flags.read_text()  # the training's closing evaluation's
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine.evaluate, "evaluate", and_meanwhile_a_resume_writes)
        assert main(["eval", str(run), "--attacks", "clean", "--num-examples", "16"]) == 2
    said = _last_line(capsys.readouterr().err)
    assert "holds another network than the one evaluated (final.pt; now: another final.pt, written while" in said
    assert "not written into the run" in said
    assert not (run / "eval.json").exists() and flags.read_text() == before and not records.exists()
    assert main(["eval", str(run), "--attacks", "clean", "--num-examples", "16"]) == 0
    assert (run / "eval.json").exists() and len(list(records.iterdir())) == 1


def test_two_evaluations_ending_together_into_one_out_folder_keep_both_attacks_flags(tmp_path, monkeypatch):
    """`arat eval CKPT --out DIR --attacks clean` beside `... --attacks pgd20`: each merged its flags into DIR's
    flags.json as read before the other wrote, so one attack's flags were lost. The merge now holds DIR's lock."""
    import threading

    import engine.evaluate
    from engine.cli import write_evaluation

    record = tmp_path / "out"
    record.mkdir()
    write_json, reading = engine.evaluate.atomic_json, threading.Event()

    def slow_write(path, data, **kwargs):  # the first merge writes late, after the second has started
        if not reading.is_set():
            reading.set()
            time.sleep(0.5)
        return write_json(path, data, **kwargs)

    monkeypatch.setattr(engine.evaluate, "atomic_json", slow_write)

    def results(attack):
        return {attack: {"num_examples": 8, "flags": "ff", "accuracy": 1.0, "config": {"model": "m", "data": "d"}}}

    target = tmp_path / "model.pt"  # a checkpoint file: the record folder is its own
    first = threading.Thread(target=write_evaluation, args=(target, record, results("clean"), {}))
    first.start()
    assert reading.wait(10)
    write_evaluation(target, record, results("pgd20"), {})
    first.join(10)
    assert set(json.loads((record / "flags.json").read_text())) == {"clean", "pgd20"}


def test_the_same_train_command_again_continues_its_run(tmp_path, capsys):
    """helper-152: a scheduler's requeue (SLURM, a Kubernetes restart, `torchrun --max-restarts`) runs the same
    `arat train --recipe X --out RUN` again, which was refused ("already holds a run", exit 2: a failure the
    scheduler does not retry). A run of the same recipe and settings is continued as `--resume RUN` does; one of other
    settings is refused, naming the first difference; how it runs (perf.*) is the command's."""
    run = tmp_path / "run"
    command = ["train", "--recipe", "smoke", "--out", str(run), "--set", "train.epochs=1", "--no-eval"]
    assert main(command) == 0
    (run / "checkpoints" / "final.pt").unlink()  # stopped after its last epoch's checkpoint, before the final one
    capsys.readouterr()
    assert main([*command, "--set", "perf.channels_last=false"]) == 0
    out = capsys.readouterr().out
    assert f"{run} holds this run (the same recipe and settings): continuing it" in out
    assert (run / "checkpoints" / "final.pt").exists() and [r["epoch"] for r in RunDir(run).metrics()] == [1]
    assert main([*command, "--set", "optim.lr=0.0123"]) == 2
    said = one_line_error(capsys)
    assert re.search(r"already holds a run with other settings \(optim\.lr: 0\.\d+ there, 0\.0123 here\)", said)
    assert f"`arat train --resume {run}`" in said
    assert main(["train", "--recipe", "demo", "--out", str(run), "--no-eval"]) == 2
    assert "other settings" in one_line_error(capsys)


def test_stop_signals_end_like_ctrl_c_once_and_nohup_s_ignored_hangup_stays_ignored():
    """helper-152: SLURM's `--signal=USR1@90` and a closed terminal's SIGHUP killed arat outright (no checkpoint
    line); a second SIGTERM (SLURM signals every process of a step, torchrun forwards its own) cut the cleanup
    short. Each stop signal now takes Ctrl-C's path once, then is ignored; one `nohup` ignores stays ignored."""
    import signal

    from engine import cli

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)}
    try:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as nohup leaves it
        replaced = cli.stop_handlers()
        assert set(replaced) == {signal.SIGTERM, signal.SIGUSR1}
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGUSR1) is cli._terminated
        with pytest.raises(KeyboardInterrupt):
            cli._terminated(signal.SIGUSR1, None)
        assert cli._stopped_by == signal.SIGUSR1
        assert all(signal.getsignal(s) == signal.SIG_IGN for s in before)  # a second one lands nowhere
    finally:
        for number, handler in before.items():
            signal.signal(number, handler)
        cli._stopped_by = None


def test_another_tool_s_weights_are_evaluated_with_a_note_on_their_inputs(tmp_path, capsys, cifar_dir):
    """helper-150: pytorch-cifar's ResNet-18 is named as this engine's but trained on normalized images: evaluated on
    [0, 1] images it reads near chance, with nothing said. A state_dict without the engine's config or model_info
    is evaluated with a note saying what it is fed (after the data is found: no note before a one-line error)."""
    torch.save({"net": {f"module.{k}": v for k, v in _weights().items()}, "acc": 95.2}, tmp_path / "ckpt.pth")
    code, out, err = run_cli(capsys, "eval", str(tmp_path / "ckpt.pth"), "--attacks", "clean", "--num-examples", "8",
                             "--data-dir", str(cifar_dir))  # fmt: skip
    assert code == 0, (out, err)
    assert "is a state_dict without this engine's config: it is fed [0, 1] images with no mean/std" in err


def test_paths_as_users_type_them(tmp_path, capsys, monkeypatch):
    """helper-157: `--data-dir=~/data`, `--set data.data_dir=~/data` and ARAT_DATA_DIR="~/data" reach arat with a
    literal `~` (no shell expands it there): "not found" for a folder that exists. A relative data folder was
    recorded as typed, so `arat eval RUN` from another folder read nothing there (or the synthetic stand-in). A
    suggested command naming a path with a space or a bracket did not paste into a shell."""
    import argparse

    from engine.cli import interrupted_line
    from engine.config import apply_overrides, default_data_dir
    from engine.recipes import get_recipe

    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    assert apply_overrides(get_recipe("smoke"), ["data.data_dir=~/data"]).data.data_dir == str(home / "data")
    monkeypatch.setenv("ARAT_DATA_DIR", "~/cifar")
    assert default_data_dir() == str(home / "cifar")
    monkeypatch.delenv("ARAT_DATA_DIR")
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "my run (v2)"
    assert main(["train", "--recipe", "smoke", "--out", str(run), "--set", "train.epochs=1", "--no-eval",
                 "--data-dir=~/data"]) == 0  # fmt: skip
    assert json.loads((run / "config.json").read_text())["data"]["data_dir"] == str(home / "data")
    assert main(["train", "--recipe", "smoke", "--out", "rel", "--set", "train.epochs=1", "--no-eval",
                 "--set", "data.data_dir=d"]) == 0  # fmt: skip
    assert json.loads((tmp_path / "rel" / "config.json").read_text())["data"]["data_dir"] == str(tmp_path / "d")
    line = interrupted_line(argparse.Namespace(command="train", run_dir=str(run)))
    assert f"`arat train --resume '{run}'`" in line  # (one word, pasted)


def test_numpy_values_beside_weights_must_be_plain_numbers(tmp_path):
    """helper-155: numpy's dtype classes, allowed for other tools' numbers, take a state from the file that can give
    a dtype fields of Python objects, read from the file's bytes as pointers: every numpy value read is checked to
    be a plain number type (here its check on values of such dtypes)."""
    from engine.models import CheckpointError, plain_numbers_only

    plain_numbers_only({"a": [np.float64(1.0), np.arange(3)], "b": (np.dtype("int64"),)}, "ok.pt")
    looped: list = []
    looped.append(looped)  # (a pickle may hold a cycle)
    plain_numbers_only({"cycle": looped}, "ok.pt")
    for bad in (np.zeros(2, dtype=[("a", "O")]), np.dtype([("x", "f8")]), np.array(["s"]), np.zeros(2, dtype="O")):
        with pytest.raises(CheckpointError, match="not a plain number type"):
            plain_numbers_only({"nested": {"value": bad}}, "bad.pt")
