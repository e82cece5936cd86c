import json

import pytest

from engine.cli import main
from engine.table import method_label, render, table


def write_run(root, name, recipe, clean, aa=None, arch="resnet18", width=64, grad_sims=(), eval_json=None):
    run = root / name
    run.mkdir(parents=True)
    cfg = {"recipe": recipe, "model": {"arch": arch, "width": width}, "data": {"dataset": "cifar10"}, "seed": 0}
    (run / "config.json").write_text(json.dumps(cfg))
    results = {"clean": {"accuracy": clean, "num_examples": 1000}}
    if aa is not None:
        results["aa"] = {"accuracy": aa, "num_examples": 500}
    (run / "results.json").write_text(json.dumps({"recipe": recipe, "results": results}))
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
    assert row_of(markdown, "ResNet-18", "AR-AT")[2:5] == ["87.50", "49.00", "136.50"]
    assert row_of(markdown, "ResNet-18", "V0 (naive)")[5:] == ["0.200", "1", "82.93 / 46.50 / 0.06"]
    assert row_of(markdown, "WRN-34-10", "TRADES")[2:5] == ["85.00", "–", "–"]  # no AA yet
    assert row_of(markdown, "ResNet-18 (width 16)", "TRADES")[2:5] == ["50.00", "25.00", "75.00"]  # eval.json wins
    methods = [line.split("|")[2].strip() for line in markdown.splitlines() if line.startswith("| ResNet-18 |")]
    assert methods == ["AT", "AR-AT", "V0 (naive)"]  # the seed's order: baselines, AR-AT, ablations
    assert "AutoAttack on 500, 1000 test images" in markdown


def test_method_labels():
    assert method_label("arat-swa-resnet18-cifar10") == "AR-AT+SWA"
    assert method_label("arat-resnet18-cifar10") == "AR-AT"
    assert method_label("at-wrn34-10-cifar100") == "AT"
    assert method_label("ablation-splitbn-resnet18-cifar10") == "+split-BN"
    assert method_label("demo") == "demo"


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
    assert main(["table", str(tmp_path / "empty")]) == 2 and "no run directory" in capsys.readouterr().err
