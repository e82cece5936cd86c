import json

import pytest

from engine.cli import main
from engine.table import TableError, method_label, render, table


def write_run(
    root, name, recipe, clean, aa=None, arch="resnet18", width=64, grad_sims=(), eval_json=None, cfg=None, env=None,
    **written,
):  # fmt: skip
    """A finished run's files; `cfg` adds to config.json's sections, `env` is env.json, `written` goes into
    results.json (e.g. dataset); `clean=None`: no results.json."""
    run = root / name
    run.mkdir(parents=True)
    if env is not None:
        (run / "env.json").write_text(json.dumps(env))
    config = {"recipe": recipe, "model": {"arch": arch, "width": width}, "data": {"dataset": "cifar10"}, "seed": 0}
    for key, value in (cfg or {}).items():
        config[key] = config.get(key, {}) | value if isinstance(value, dict) else value
    (run / "config.json").write_text(json.dumps(config))
    if clean is None:
        (run / "eval.json").write_text(json.dumps({"dataset": "cifar10", "results": eval_json}))
        return run
    results = {"clean": {"accuracy": clean, "num_examples": 1000}}
    if aa is not None:
        results["aa"] = {"accuracy": aa, "num_examples": 500}
    (run / "results.json").write_text(json.dumps({"recipe": recipe, "results": results} | written))
    rows = [json.dumps({"epoch": i + 1, "grad_sim": s}) + "\n" for i, s in enumerate(grad_sims)]
    (run / "metrics.jsonl").write_text("".join(rows))
    if eval_json is not None:
        (run / "eval.json").write_text(json.dumps({"dataset": "cifar10", "results": eval_json}))
    return run


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "at-s0", "at-resnet18-cifar10", 0.80, 0.40)
    write_run(root, "at-s1", "at-resnet18-cifar10", 0.82, 0.44)
    write_run(root, "arat", "arat-resnet18-cifar10", 0.875, 0.49)
    write_run(root, "v0", "ablation-v0-resnet18-cifar10", 0.83, 0.46, grad_sims=(0.1, 0.3))
    write_run(root, "wide", "trades-wrn34-10-cifar10", 0.85, None, arch="wrn34-10")
    later_aa = {"aa": {"accuracy": 0.25, "num_examples": 1000}}
    write_run(root, "small", "trades-resnet18-cifar10", 0.5, 0.2, width=16, eval_json=later_aa)
    return root


def row_of(markdown: str, *cells: str) -> list[str]:
    for line in markdown.splitlines():
        parts = [p.strip() for p in line.strip("|").split("|")]
        if parts[: len(cells)] == list(cells):
            return parts
    raise AssertionError(f"no row {cells} in\n{markdown}")


def test_table_means_stds_sums_and_paper_numbers(runs):
    markdown = render(table([str(runs)]))
    header = row_of(markdown, "model", "method")
    assert header == ["model", "method", "clean", "AA", "sum", "grad-sim", "runs", "seed paper (clean / AA / grad-sim)"]
    # two seeds: mean ± sample std; the sum is per run, then averaged
    at = ["81.00 ± 1.41", "42.00 ± 2.83", "123.00 ± 4.24", "–", "2", "83.77 / 42.42"]
    assert row_of(markdown, "ResNet-18", "AT") == ["ResNet-18", "AT", *at]
    # the main recipe's AR-AT beside an ablation row: the main table's published numbers, not the ablation table's
    assert row_of(markdown, "ResNet-18", "AR-AT")[2:] == ["87.50", "49.00", "136.50", "–", "1", "87.82 / 49.02"]
    assert row_of(markdown, "ResNet-18", "V0 (naive)")[5:] == ["0.200", "1", "82.93 / 46.50 / 0.06"]
    assert row_of(markdown, "WRN-34-10", "TRADES")[2:5] == ["85.00", "–", "–"]  # no AA yet
    assert row_of(markdown, "ResNet-18 (width 16)", "TRADES")[2:5] == ["50.00", "25.00", "75.00"]  # eval.json wins
    methods = [line.split("|")[2].strip() for line in markdown.splitlines() if line.startswith("| ResNet-18 |")]
    assert methods == ["AT", "AR-AT", "V0 (naive)"]  # the seed's order: baselines, AR-AT, ablations
    note = next(line for line in markdown.splitlines() if line.startswith("Accuracy in %"))
    assert note.endswith(
        "; clean and PGD-20 on 1000 test images; AutoAttack on 500 test images (ResNet-18 AT, "
        "ResNet-18 AR-AT, ResNet-18 V0 (naive)), on 1000 test images (ResNet-18 (width 16) TRADES)."
    )


def test_method_labels():
    assert method_label("arat-swa-resnet18-cifar10") == "AR-AT+SWA"
    assert method_label("arat-resnet18-cifar10") == "AR-AT"
    assert method_label("at-wrn34-10-cifar100") == "AT"
    assert method_label("ablation-splitbn-resnet18-cifar10") == "+split-BN"
    assert method_label("demo") == "demo"


def arat_cfg(split_bn=True, asymmetric=True, **top):
    method = {"name": "arat", "stop_grad": asymmetric, "predictor": asymmetric}
    cfg = {"model": {"split_bn": split_bn}, "method": method, "epochs": 4, "eval": {"num_examples": 1000}}
    return cfg | {"perf": {"dtype": "bf16"}} | top


def test_rows_follow_what_the_config_computes(tmp_path):
    root = tmp_path / "runs"
    # the ablation rows made from another recipe (as docs/methods.md's CPU run does): each is the row it computes
    write_run(root, "v0", "demo", 0.50, 0.20, width=16, cfg=arat_cfg(False, False), grad_sims=(0.0, 0.02))
    write_run(root, "sg", "demo", 0.45, 0.21, width=16, cfg=arat_cfg(False, True), grad_sims=(0.1, 0.3))
    write_run(root, "sb", "demo", 0.48, 0.22, width=16, cfg=arat_cfg(True, False))
    # two seeds of one setting share a row (their evaluation and speed switches may differ); a longer run of the
    # same method gets its own row, each labelled with what tells them apart
    write_run(root, "ar-s0", "demo", 0.40, 0.10, width=16, cfg=arat_cfg())
    seed1 = arat_cfg(seed=1, eval={"num_examples": 500}, perf={"dtype": "fp32"})
    write_run(root, "ar-s1", "demo", 0.50, 0.20, width=16, cfg=seed1)
    write_run(root, "ar-long", "demo", 0.70, 0.40, width=16, cfg=arat_cfg(epochs=8))
    # a recipe whose method was overridden is tabulated as the method it ran
    write_run(root, "trades", "at-resnet18-cifar10", 0.6, 0.3, width=16, cfg={"method": {"name": "trades"}})
    write_run(root, "ab", "ablation-arat-resnet18-cifar10", 0.6, 0.3, width=16, cfg=arat_cfg(epochs=2))
    md = render(table([str(root)]))
    width16 = "ResNet-18 (width 16)"
    assert row_of(md, width16, "V0 (naive)")[2:] == ["50.00", "20.00", "70.00", "0.010", "1", "82.93 / 46.50 / 0.06"]
    assert row_of(md, width16, "+stop-grad")[5:] == ["0.200", "1", "82.47 / 45.21 / 0.68"]
    assert row_of(md, width16, "+split-BN")[2] == "48.00"
    assert row_of(md, width16, "AR-AT (epochs=4)")[2:4] + row_of(md, width16, "AR-AT (epochs=4)")[6:] == [
        "45.00 ± 7.07",
        "15.00 ± 7.07",
        "2",
        "85.51 / 49.30 / 0.59",
    ]  # fmt: skip  (beside ablation rows: theirs)
    assert row_of(md, width16, "AR-AT (epochs=8)")[2] == "70.00"
    assert row_of(md, width16, "TRADES")[2] == "60.00" and row_of(md, width16, "AR-AT (ablation)")[2] == "60.00"
    assert "| AT |" not in md and "demo" not in md


def test_a_run_on_synthetic_stand_in_data_is_not_tabulated_as_cifar(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "real", "demo", 0.30, 0.15, width=16, cfg=arat_cfg())
    write_run(root, "fell-back", "demo", 0.90, 0.60, width=16, cfg=arat_cfg(), dataset="synthetic")
    md = render(table([str(root)]))
    cifar, synthetic = md.split("### synthetic")
    assert "30.00" in cifar and "90.00" not in cifar
    assert "90.00" in synthetic and "seed paper" not in synthetic and "87.82" not in synthetic


def test_settings_labels_and_method_labels_from_configs():
    from engine.table import config_label, training_settings

    assert config_label({"method": {"name": "arat"}, "model": {"split_bn": True}, "swa": {"enabled": True}}) == (
        "AR-AT+SWA"
    )
    odd = {"method": {"name": "arat", "stop_grad": True, "predictor": False}, "model": {"split_bn": True}}
    assert config_label(odd) == "AR-AT (split_bn=true, stop_grad=true, predictor=false)"
    assert config_label({"method": {"name": "std"}}) == "Std. training" and config_label({"recipe": "x"}) is None
    cfg = {"seed": 3, "epochs": 4, "data": {"dataset": "cifar10", "data_dir": "/d", "train_subset": 9}, "eval": {}}
    settings = {"world_size": 1, "epochs": 4, "data.dataset": "cifar10", "data.train_subset": 9}
    assert training_settings(cfg, "cifar10") == settings
    # keys the method does not read: AR-AT's beta, ARREST's teacher path, SWA's schedule with SWA off
    cfg["method"] = {"name": "arat", "beta": 6.0, "invariance_weight": 30.0, "init": "/runs/std"}
    cfg["swa"] = {"enabled": False, "start_epoch": 76}
    assert training_settings(cfg, "cifar10", 8) == settings | {
        "world_size": 8, "method.name": "arat", "method.invariance_weight": 30.0, "swa.enabled": False,
        "dist.sync_bn": False}  # fmt: skip


def test_rows_are_not_split_by_what_does_not_change_training(tmp_path):
    root = tmp_path / "runs"
    arrest = {"method": {"name": "arrest", "pretrain_epochs": 0, "finetune_lr": 0.025}, "epochs": 20}
    for seed in (0, 1):  # each seed fine-tunes its own standard-trained network: init paths differ
        cfg = arrest | {"seed": seed, "method": arrest["method"] | {"init": f"/runs/std-s{seed}"}}
        write_run(root, f"arrest-s{seed}", "arrest-resnet18-cifar10", 0.8 + seed / 100, 0.4, cfg=cfg)
    # keys AR-AT does not read (beta), SWA's schedule with SWA off, a key an older engine did not write
    older = arat_cfg(method=arat_cfg()["method"] | {"beta": 6.0}, swa={"enabled": False, "start_epoch": 76})
    newer = arat_cfg(seed=1, method=older["method"] | {"published_bn_updates": True, "beta": 5.0})
    newer["swa"] = {"enabled": False, "start_epoch": 3}
    write_run(root, "old", "arat-resnet18-cifar10", 0.80, 0.40, cfg=older)
    write_run(root, "new", "arat-resnet18-cifar10", 0.90, 0.50, cfg=newer)
    md = render(table([str(root)]))
    assert row_of(md, "ResNet-18", "ARREST")[2] == "80.50 ± 0.71"
    assert row_of(md, "ResNet-18", "AR-AT")[2] == "85.00 ± 7.07"


def test_what_does_change_training_splits_rows_in_numeric_order(tmp_path):
    root = tmp_path / "runs"
    for epochs in (10, 4):  # one process, recorded (an older engine's run, recording none, joins a row: below)
        write_run(root, f"e{epochs}", "demo", epochs / 100, width=16, cfg=arat_cfg(epochs=epochs),
                  environment={"world_size": 1})  # fmt: skip
    # 8 processes, each with a batch of its own: another training than one process (results.json's environment)
    write_run(root, "ddp", "demo", 0.3, width=16, cfg=arat_cfg(epochs=4), environment={"world_size": 8})
    odd = arat_cfg(epochs=4, method=arat_cfg()["method"] | {"predictor": False})
    write_run(root, "odd", "demo", 0.5, width=16, cfg=odd)
    write_run(root, "odd-long", "demo", 0.6, width=16, cfg=odd | {"epochs": 10})
    md = render(table([str(root)]))
    methods = [line.split("|")[2].strip() for line in md.splitlines() if line.startswith("| ResNet-18")]
    assert methods[:3] == ["AR-AT (epochs=4, world_size=1)", "AR-AT (epochs=4, world_size=8)",
                           "AR-AT (epochs=10, world_size=1)"]  # fmt: skip
    assert methods[3:5] == ["AR-AT (split_bn=true, stop_grad=true, predictor=false; epochs=4)",
                            "AR-AT (split_bn=true, stop_grad=true, predictor=false; epochs=10)"]  # fmt: skip


def test_a_run_recorded_less_of_joins_a_row_only_where_it_fits_no_other(tmp_path):
    for order in ((1, 0, 2), (0, 2, 1), (2, 1, 0)):  # the directories' order does not matter
        root = tmp_path / "".join(map(str, order))
        cfgs = [arat_cfg(epochs=4), {}, arat_cfg(epochs=8)]  # the middle one: an engine that wrote no settings
        for i in order:
            write_run(root, f"r{i}", "arat-resnet18-cifar10", 0.1 * (i + 1), cfg=cfgs[i])
        methods = [line.split("|")[2].strip() for line in render(table([str(root)])).splitlines() if "| AR-AT" in line]
        assert sorted(methods) == ["AR-AT (epochs=4)", "AR-AT (epochs=8)", "AR-AT (epochs=?)"], order
    root = tmp_path / "one-fit"
    write_run(root, "full", "arat-resnet18-cifar10", 0.4, cfg=arat_cfg(epochs=4))
    write_run(root, "partial", "arat-resnet18-cifar10", 0.6, cfg={})  # fits the one row there is
    assert row_of(render(table([str(root)])), "ResNet-18", "AR-AT")[2] == "50.00 ± 14.14"


def test_training_data_and_processes_come_from_env_json(tmp_path):
    """env.json (written when training starts) says what the run trained on, also for `--no-eval` runs that only
    a later `arat eval` evaluated: an 8-process run is not averaged with 1-process ones, a run on synthetic stand-in
    data evaluated only on CIFAR-10 is refused with what to do."""
    root = tmp_path / "runs"
    on_cifar = {"clean": {"accuracy": 0.5, "num_examples": 100}}
    write_run(
        root, "one", "demo", None, cfg=arat_cfg(), env={"dataset": "cifar10", "world_size": 1}, eval_json=on_cifar
    )
    write_run(root, "eight", "demo", None, cfg=arat_cfg(seed=1), env={"dataset": "cifar10", "world_size": 8},
              eval_json=on_cifar)  # fmt: skip
    md = render(table([str(root)]))
    assert row_of(md, "ResNet-18", "AR-AT (world_size=1)") and row_of(md, "ResNet-18", "AR-AT (world_size=8)")
    # synchronized BN statistics train something else at 8 processes (METHOD's BN batch): a row of their own
    write_run(root, "synced", "demo", None, cfg=arat_cfg(seed=2, dist={"sync_bn": True}),
              env={"dataset": "cifar10", "world_size": 8}, eval_json=on_cifar)  # fmt: skip
    labels = [line.split("|")[2].strip() for line in render(table([str(root)])).splitlines() if "| AR-AT" in line]
    assert len(labels) == 3 and any("dist.sync_bn=true" in label for label in labels), labels
    fell_back = write_run(tmp_path, "fell-back", "demo", None, cfg=arat_cfg(), env={"dataset": "synthetic"},
                          eval_json=on_cifar)  # fmt: skip
    with pytest.raises(TableError, match="--dataset synthetic"):
        table([str(fell_back)])
    old = write_run(tmp_path, "old", "demo", 0.3, cfg=arat_cfg(data={"synthetic_fallback": True}))
    assert "does not record its training data" in render(table([str(old)]))


def test_an_evaluation_on_other_data_is_left_out_and_said(tmp_path):
    root = tmp_path / "runs"
    on_cifar = {"aa": {"accuracy": 0.01, "num_examples": 1000}}
    write_run(root, "fell-back", "demo", 0.9, 0.6, width=16, cfg=arat_cfg(), dataset="synthetic", eval_json=on_cifar)
    md = render(table([str(root)]))
    assert "CIFAR-10" not in md.split("Notes:")[0] and row_of(md, "ResNet-18 (width 16)", "AR-AT")[3] == "60.00"
    assert "eval.json (cifar10) left out: the run trained on synthetic" in md


def test_step_sizes_are_shown_in_255ths(tmp_path):
    root = tmp_path / "runs"
    for name, step in (("a", 2 / 255), ("b", 2.5 / 255)):
        write_run(root, name, "demo", 0.5, width=16, cfg=arat_cfg(attack={"step_size": step}))
    md = render(table([str(root)]))
    assert row_of(md, "ResNet-18 (width 16)", "AR-AT (attack.step_size=2/255)")
    assert row_of(md, "ResNet-18 (width 16)", "AR-AT (attack.step_size=2.5/255)")


def test_cli_writes_markdown_and_plot(runs, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "table.md", tmp_path / "tradeoff.png"
    dirs = [str(runs / name) for name in ("at-s0", "at-s1", "arat")]
    assert main(["table", *dirs, "--out", str(out), "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    assert out.read_text().strip() in printed and "| ResNet-18 | AT | 81.00 ± 1.41" in printed
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "2 measured points" in printed


def test_missing_matplotlib_is_one_line(runs, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    code = main(["table", str(runs), "--plot", str(tmp_path / "p.png")])
    err = capsys.readouterr().err
    assert code == 2 and "pip install matplotlib" in err and len(err.strip().splitlines()) == 1


def test_runs_without_results_are_refused(tmp_path, capsys):
    run = write_run(tmp_path, "r", "at-resnet18-cifar10", 0.8)
    (run / "results.json").unlink()
    assert main(["table", str(run)]) == 2 and "--resume" in capsys.readouterr().err  # no checkpoint either
    (run / "checkpoints").mkdir(exist_ok=True)
    (run / "checkpoints" / "final.pt").write_bytes(b"")
    assert main(["table", str(run)]) == 2 and "arat eval" in capsys.readouterr().err
    assert main(["table", str(tmp_path / "empty")]) == 2 and "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["table", str(tmp_path / "empty")]) == 2 and "no run directory" in capsys.readouterr().err


def test_a_sum_needs_every_run_and_the_symmetric_variant_splits_rows(tmp_path):
    """A row whose runs are not all evaluated with AutoAttack shows no sum (clean's mean would be over more runs);
    AR-AT's method.symmetric (full or average) is another training: its own row."""
    root = tmp_path / "runs"
    write_run(root, "a", "at-resnet18-cifar10", 0.80, 0.40)
    write_run(root, "b", "at-resnet18-cifar10", 0.90, None, cfg={"seed": 1})
    v0 = {"method": {"name": "arat", "stop_grad": False, "predictor": False}, "model": {"split_bn": False}}
    for name, symmetric in (("full", "full"), ("half", "average")):
        cfg = v0 | {"method": v0["method"] | {"symmetric": symmetric}}
        write_run(root, name, "ablation-v0-resnet18-cifar10", 0.8, 0.4, cfg=cfg)
    md = render(table([str(root)]))
    assert row_of(md, "ResNet-18", "AT")[2:5] == ["85.00 ± 7.07", "40.00 (1 of 2 runs)", "–"]  # not AT's figure
    labels = [line.split("|")[2].strip() for line in md.splitlines() if "V0" in line]
    assert len(labels) == 2 and any("symmetric=average" in label for label in labels), labels


def test_a_legacy_10_row_says_so_alone_and_seeds_on_other_image_counts_are_not_averaged(tmp_path):
    """helper-84: a run evaluated only by legacy-10 stood in the table as "AT" (no sibling differed, so no label), and
    seeds with 1,000-image and 10,000-image AutoAttack (eval.aa_num_examples) were averaged into one cell."""
    root = tmp_path / "runs"
    legacy = {"accuracy": 0.52, "num_examples": 500, "version": "legacy-10"}
    write_run(root, "at", "at-resnet18-cifar10", 0.84, None, eval_json={"aa-legacy-10": legacy})
    assert row_of(render(table([str(root)])), "ResNet-18", "AT (aa_version=legacy-10)")[3] == "52.00"
    root = tmp_path / "counts"
    for seed, n in enumerate((1000, 10000, 10000)):
        aa = {"aa": {"accuracy": 0.40 + seed / 100, "num_examples": n}}
        write_run(root, f"s{seed}", "arat-resnet18-cifar10", 0.8, None, eval_json=aa, cfg={"seed": seed})
    md = render(table([str(root)]))
    assert row_of(md, "ResNet-18", "AR-AT (aa_images=1000)")[3] == "40.00"
    assert row_of(md, "ResNet-18", "AR-AT (aa_images=10000)")[3:6] == ["41.50 ± 0.71", "121.50 ± 0.71", "2"]
    assert "AutoAttack on 1000 test images (AR-AT (aa_images=1000)), on 10000 test images" in md


def test_autoattack_versions_split_rows_and_a_smaller_rerun_of_the_same_network_keeps_the_fuller_figure(tmp_path):
    """A `--aa-version legacy-10` evaluation (eval.json) became the run's AA with no label and was averaged with
    standard-AA seeds in one row, and then replaced the run's standard figure; a quick `arat eval RUN
    --num-examples 100` of the same network replaced the table's 10k clean figure. Now the protocol splits rows
    (labelled), a run's standard figure is kept beside a later legacy-10 one (the legacy-10 row holds runs with no
    standard figure), and a later evaluation of the same weights on fewer images does not replace the fuller one
    (of other weights, or on more images, it does). Both the current record key and an older engine's "aa" key
    with its version inside are read as legacy-10."""
    from engine.rundir import results_on

    root = tmp_path / "runs"
    legacy = {"accuracy": 0.52, "num_examples": 500, "version": "legacy-10"}
    write_run(root, "s0", "at-resnet18-cifar10", 0.80, 0.40)
    write_run(root, "s1", "at-resnet18-cifar10", 0.82, 0.44, eval_json={"aa": legacy})  # an older engine's key
    write_run(root, "s2", "at-resnet18-cifar10", 0.84, None, eval_json={"aa-legacy-10": legacy}, cfg={"seed": 2})
    md = render(table([str(root)]))
    assert row_of(md, "ResNet-18", "AT (aa_version=legacy-10)")[3] == "52.00"  # s2 alone
    assert row_of(md, "ResNet-18", "AT (aa_version=standard)")[3] == "42.00 ± 2.83"  # s0 and s1's standard figures
    full = {"clean": {"accuracy": 0.8, "num_examples": 10000, "config": {"model": "abc"}}}
    quick = {"clean": {"accuracy": 0.7, "num_examples": 100, "config": {"model": "abc"}}}
    other = {"clean": {"accuracy": 0.6, "num_examples": 100, "config": {"model": "def"}}}
    more = {"clean": {"accuracy": 0.81, "num_examples": 10000, "config": {"model": "abc"}}}
    pick = lambda later: results_on("cifar10", [("results.json", {"results": full}), ("eval.json", {"results": later})])  # noqa: E731
    assert pick(quick)[0]["clean"]["accuracy"] == 0.8
    assert pick(other)[0]["clean"]["accuracy"] == 0.6 and pick(more)[0]["clean"]["accuracy"] == 0.81


def test_an_unfinished_run_keeps_its_method_s_place_and_paper_numbers(tmp_path):
    """An unfinished run (latest.pt, no final.pt) has a row of its own, labelled, but still its method's: its place
    among the methods and the seed's published figures (helper-86: the label had become the row's method)."""
    root = tmp_path / "runs"
    write_run(root, "arat", "arat-resnet18-cifar10", 0.875, 0.49)
    write_run(root, "at-done", "at-resnet18-cifar10", 0.80, 0.40)
    killed = write_run(root, "at-killed", "at-resnet18-cifar10", 0.70, 0.30, cfg={"seed": 1, "epochs": 100})
    (killed / "checkpoints").mkdir()
    (killed / "checkpoints" / "latest.pt").write_bytes(b"")
    (killed / "metrics.jsonl").write_text('{"epoch": 50}\n')
    md = render(table([str(root)]))
    methods = [line.split("|")[2].strip() for line in md.splitlines() if line.startswith("| ResNet-18 |")]
    assert methods == ["AT", "AT (unfinished: after epoch 50 of 100)", "AR-AT"], methods
    assert row_of(md, "ResNet-18", "AT (unfinished: after epoch 50 of 100)")[2:4] == ["70.00", "30.00"]
    assert row_of(md, "ResNet-18", "AT (unfinished: after epoch 50 of 100)")[-1] == "83.77 / 42.42"


def test_an_older_engine_s_fuller_figure_stays_and_its_unrecorded_processes_split_no_row():
    """helper-118: a run that did not record its processes was labelled world_size=1, a row apart from a 2-process
    run of the same settings. A fuller figure of the same network (its weights' hash) stays against a quick
    re-evaluation on fewer images; one without the hash (an older engine's) may be another network's: replaced."""
    from engine.rundir import results_on
    from engine.table import training_settings

    old = {"results": {"clean": {"accuracy": 0.1875, "num_examples": 64}}}  # no config, no model hash
    quick = {"results": {"clean": {"accuracy": 0.125, "num_examples": 16, "config": {"model": "ab12"}}}}
    # (helper-119) an older engine's results.json may be a shorter run's, left when it trained on past its end:
    # without a hash to say it is the same network, the later figure replaces it
    results, _ = results_on("synthetic", [("results.json", old), ("eval.json", quick)])
    assert results["clean"]["num_examples"] == 16
    same = {"results": {"clean": old["results"]["clean"] | {"config": {"model": "ab12"}}}}
    results, _ = results_on("synthetic", [("results.json", same), ("eval.json", quick)])
    assert results["clean"]["num_examples"] == 64  # the same network: the fuller figure stays
    cfg = {"recipe": "smoke", "model": {"arch": "resnet18"}, "dist": {"sync_bn": False}}
    assert "world_size" not in training_settings(cfg, "synthetic", None)
    assert training_settings(cfg, "synthetic", 2)["world_size"] == 2


def test_an_older_engine_s_trades_run_gets_a_row_apart_from_today_s(tmp_path):
    """helper-119: a TRADES config.json written before method.published_bn_updates (one BN update per half) joined
    the row of today's runs (the key missing agreed with any value): it is read as what it trained with, false."""
    root = tmp_path / "runs"
    base = {"recipe": "trades-resnet18-cifar10", "model": {"arch": "resnet18", "width": 16, "split_bn": False},
            "data": {"dataset": "cifar10"}, "epochs": 4}  # fmt: skip
    write_run(root, "old", "trades-resnet18-cifar10", 0.8, cfg=base | {"method": {"name": "trades", "beta": 6.0}})
    write_run(root, "new", "trades-resnet18-cifar10", 0.9,
              cfg=base | {"method": {"name": "trades", "beta": 6.0, "published_bn_updates": True}})  # fmt: skip
    methods = [line.split("|")[2].strip() for line in render(table([str(root)])).splitlines() if "TRADES" in line]
    assert len(methods) == 2 and any("published_bn_updates=false" in m for m in methods), methods


def test_pgd20_on_other_image_counts_splits_rows_and_is_said_apart(tmp_path):
    """helper-156: only the clean and AutoAttack counts split rows, and the note said "clean and PGD-20 on N" with
    clean's N: a seed whose PGD-20 covered 64 images (a later `arat eval --attacks pgd20`) was averaged with one of
    32, under the clean count."""
    root = tmp_path / "runs"
    for seed, n in enumerate((32, 64)):
        pgd = {"pgd20": {"accuracy": 0.1 + seed / 10, "num_examples": n}}
        write_run(root, f"s{seed}", "arat-resnet18-cifar10", 0.8, None, eval_json=pgd, cfg={"seed": seed})
    md = render(table([str(root)]))
    assert row_of(md, "ResNet-18", "AR-AT (pgd20_images=32)") and row_of(md, "ResNet-18", "AR-AT (pgd20_images=64)")
    assert "clean on 1000 test images; PGD-20 on 32 test images" in md, md
    same = tmp_path / "same"
    for seed in (0, 1):  # PGD-20 on the clean images: one row, said together, no label
        pgd = {"pgd20": {"accuracy": 0.1, "num_examples": 1000}}
        write_run(same, f"s{seed}", "arat-resnet18-cifar10", 0.8, None, eval_json=pgd, cfg={"seed": seed})
    md = render(table([str(same)]))
    assert "2" in row_of(md, "ResNet-18", "AR-AT") and "clean and PGD-20 on 1000 test images" in md, md
