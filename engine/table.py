"""`arat table`: the seed's results table from run directories, and a clean-vs-AutoAttack trade-off plot.

Rows are method x model (mean ± sample std over the runs that differ only in their seed): clean, AA and their sum
(in %), with PGD-20, the mean gradient similarity (analysis.grad_sim runs) and the seed's published numbers
(METHOD 5 and 8) when there are any. A run's method is what its config computes (an AR-AT run whose switches make
it an ablation row is tabulated as that row, whatever recipe it started from); runs of one method whose training
settings differ get a row each, labelled with the settings that tell them apart. A run's accuracies and dataset
come from its `results.json`, overridden by a later `arat eval RUN_DIR` (`eval.json`): a run whose real data was
absent and replaced by synthetic data is tabulated as synthetic, not beside the paper's CIFAR-10 numbers.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError

# recipe prefix -> method label, in table order
METHOD_LABELS = {
    "std": "Std. training",
    "at": "AT",
    "trades": "TRADES",
    "mart": "MART",
    "lbgat": "LBGAT",
    "arrest": "ARREST",
    "arat": "AR-AT",
    "arat-swa": "AR-AT+SWA",
    "ablation-v0": "V0 (naive)",
    "ablation-stopgrad": "+stop-grad",
    "ablation-splitbn": "+split-BN",
    "ablation-arat": "AR-AT (ablation)",
}
ABLATION_LABELS = {v for k, v in METHOD_LABELS.items() if k.startswith("ablation-")}
# AR-AT's (model.split_bn, method.stop_grad, method.predictor) -> the row it computes (METHOD 5)
ARAT_VARIANTS = {
    (True, True, True): "AR-AT",
    (False, False, False): "V0 (naive)",
    (False, True, True): "+stop-grad",
    (True, False, False): "+split-BN",
}
# config keys that do not change what a run trains (besides the seed, which tells repeats of one setting apart)
NOT_SETTINGS = {"recipe", "description", "seed", "log_every", "eval", "perf", "dist", "analysis"}
NOT_DATA_SETTINGS = {"data_dir", "backend", "synthetic_fallback"}
# (arch, label) -> (clean, AA, grad-sim or None): the seed's CIFAR-10 numbers (METHOD 8; ablations METHOD 5 and
# the seed poster)
PUBLISHED = {
    ("resnet18", "Std. training"): (94.17, 0.00, None),
    ("resnet18", "AT"): (83.77, 42.42, None),
    ("resnet18", "TRADES"): (81.25, 48.54, None),
    ("resnet18", "MART"): (82.15, 47.83, None),
    ("resnet18", "LBGAT"): (85.00, 48.85, None),
    ("resnet18", "ARREST"): (86.63, 46.14, None),
    ("resnet18", "AR-AT"): (87.82, 49.02, None),
    ("resnet18", "AR-AT+SWA"): (86.44, 50.28, None),
    ("wrn34-10", "AR-AT"): (90.89, 50.77, None),
    ("wrn34-10", "AR-AT+SWA"): (90.06, 54.03, None),
    ("resnet18", "V0 (naive)"): (82.93, 46.50, 0.06),
    ("resnet18", "+stop-grad"): (82.47, 45.21, 0.68),
    ("resnet18", "+split-BN"): (84.35, 47.96, 0.14),
    ("resnet18", "AR-AT (ablation)"): (85.51, 49.30, 0.59),
    ("wrn34-10", "V0 (naive)"): (86.25, 41.17, 0.03),
    ("wrn34-10", "+stop-grad"): (86.60, 42.04, 0.31),
    ("wrn34-10", "+split-BN"): (87.13, 47.31, 0.01),
    ("wrn34-10", "AR-AT (ablation)"): (88.27, 47.98, 0.23),
}
DATASETS = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "synthetic": "synthetic"}


class TableError(UserError):
    """A run directory that can't be tabulated; the message says what to do."""


@dataclass
class RunResult:
    recipe: str
    label: str  # method label (what the config computes)
    arch: str  # resnet18 | wrn34-10
    model: str  # display name, with the width when it is not the real network's
    dataset: str
    accuracy: dict[str, float]  # attack -> accuracy in %
    num_examples: dict[str, int]
    grad_sim: float | None
    settings: dict = field(default_factory=dict)  # the training settings, flattened (dotted keys), seed left out


def method_label(recipe: str) -> str:
    prefixes = sorted(METHOD_LABELS, key=len, reverse=True)  # "arat-swa" before "arat"
    return next((METHOD_LABELS[p] for p in prefixes if recipe.startswith(p + "-")), recipe)


def config_label(cfg: dict) -> str | None:
    """The method label a run's config gives (None for a config.json without a method section)."""
    method, model = cfg.get("method"), cfg.get("model", {})
    if not isinstance(method, dict) or "name" not in method:
        return None
    if method["name"] != "arat":
        return METHOD_LABELS.get(method["name"], method["name"])
    switches = tuple(bool(v) for v in (model.get("split_bn", True), method.get("stop_grad", True),
                                        method.get("predictor", True)))  # fmt: skip
    label = ARAT_VARIANTS.get(switches)
    if label is None:
        names = ("split_bn", "stop_grad", "predictor")
        label = "AR-AT (" + ", ".join(f"{n}={str(v).lower()}" for n, v in zip(names, switches, strict=True)) + ")"
    swa = cfg.get("swa", {})
    return label + ("+SWA" if isinstance(swa, dict) and swa.get("enabled") else "")


def run_label(recipe: str, cfg: dict) -> str:
    """The recipe's label where the config still computes that method, else the config's own."""
    named, own = method_label(recipe), config_label(cfg)
    if own is None or own == named or (named == "AR-AT (ablation)" and own == "AR-AT"):
        return named
    return own


def training_settings(cfg: dict) -> dict:
    """What a run trains, flattened to dotted keys: the config without its seed, evaluation and speed switches."""
    flat = {}
    for key, value in cfg.items():
        if key in NOT_SETTINGS:
            continue
        if isinstance(value, dict):
            skip = NOT_DATA_SETTINGS if key == "data" else set()
            flat |= {f"{key}.{k}": v for k, v in value.items() if k not in skip}
        else:
            flat[key] = value
    return flat


def _show(key: str, value) -> str:
    if key.endswith(("eps", "step_size")) and isinstance(value, float):
        return f"{value * 255:.4g}/255"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ",".join(_show(key, v) for v in value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def model_name(model: dict) -> str:
    if model["arch"] == "wrn34-10":
        return "WRN-34-10"
    return "ResNet-18" if model.get("width", 64) == 64 else f"ResNet-18 (width {model['width']})"


def run_dirs(paths: list[str]) -> list[Path]:
    """The runs named on the command line; a directory of runs stands for the runs inside it."""
    found = []
    for name in paths:
        path = Path(name)
        if (path / "config.json").exists():
            found.append(path)
            continue
        inner = sorted(p.parent for p in path.glob("*/config.json")) if path.is_dir() else []
        if not inner:
            raise TableError(
                f"{path} is no run directory (no config.json) and holds none: pass `arat train` --out dirs"
            )
        found += inner
    return found


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TableError(f"{path} is not valid JSON ({e}); it is corrupt or was cut short") from None
    if not isinstance(data, dict):
        raise TableError(f"{path} holds a JSON {type(data).__name__}, not the object this engine writes")
    return data


def read_run(path: Path) -> RunResult:
    """One run's row; corrupt or incomplete files are a `TableError` naming the file, never a traceback."""
    from .rundir import RunDir

    files = [path / "config.json", *(path / n for n in ("results.json", "eval.json") if (path / n).exists())]
    cfg, *evaluations = (_read_json(f) for f in files)
    try:
        results: dict = {}
        for evaluation in evaluations:  # a later `arat eval` overrides the end-of-training evaluation
            results |= evaluation["results"]
        accuracy = {k: 100 * v["accuracy"] for k, v in results.items()}
        num_examples = {k: v["num_examples"] for k, v in results.items()}
        recipe, arch, dataset = cfg["recipe"], cfg["model"]["arch"], cfg["data"]["dataset"]
        for evaluation in evaluations:  # the dataset actually used (synthetic where the fallback replaced it)
            dataset = evaluation.get("dataset", dataset)
        model = model_name(cfg["model"])
        label = run_label(recipe, cfg)
    except (KeyError, TypeError, AttributeError) as e:
        names = ", ".join(f.name for f in files)
        raise TableError(
            f"{path}: {names} lack what this engine writes ({type(e).__name__}: {e}); rewrite the results with "
            f"`arat eval {path}`"
        ) from None
    if not results:
        if not (path / "checkpoints" / "latest.pt").exists() and not (path / "checkpoints" / "final.pt").exists():
            raise TableError(
                f"{path} has no results and no checkpoint yet: it is still in its first epoch (wait for it) or "
                f"was interrupted (continue it with `arat train --resume {path}`)"
            )
        raise TableError(f"{path} has no results.json or eval.json: evaluate it with `arat eval {path}`")
    rows = RunDir(path).metrics()
    sims = [r["grad_sim"] for r in rows if "grad_sim" in r]
    return RunResult(
        recipe=recipe,
        label=label,
        arch=arch,
        model=model,
        dataset=dataset,
        accuracy=accuracy,
        num_examples=num_examples,
        grad_sim=statistics.fmean(sims) if sims else None,
        settings=training_settings(cfg),
    )


@dataclass
class Row:
    """One table row: the runs of one method and one training setting (its seeds) on one model and dataset."""

    label: str  # the method, plus the settings that tell this row from others of the same method, if any
    arch: str
    model: str
    dataset: str
    runs: list[RunResult]
    method: str = ""  # the method alone (ordering, the paper's numbers)

    def __post_init__(self):
        self.method = self.method or self.label

    def values(self, key: str) -> list[float]:
        if key == "sum":
            pairs = [(r.accuracy.get("clean"), r.accuracy.get("aa")) for r in self.runs]
            return [c + a for c, a in pairs if c is not None and a is not None]
        if key == "grad_sim":
            return [r.grad_sim for r in self.runs if r.grad_sim is not None]
        return [r.accuracy[key] for r in self.runs if key in r.accuracy]

    def mean(self, key: str) -> float | None:
        values = self.values(key)
        return statistics.fmean(values) if values else None

    def cell(self, key: str, digits: int = 2) -> str:
        values = self.values(key)
        if not values:
            return "–"
        text = f"{statistics.fmean(values):.{digits}f}"
        return text + (f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else "")

    def paper(self, with_sim: bool) -> str:
        """The seed's published clean / AA (/ grad-sim) for this method and network, on CIFAR-10."""
        published = PUBLISHED.get((self.arch, self.method)) if self.dataset == "cifar10" else None
        if published is None:
            return ""
        clean, aa, sim = published
        return f"{clean:.2f} / {aa:.2f}" + (f" / {sim:.2f}" if with_sim and sim is not None else "")


def group(runs: list[RunResult]) -> list[Row]:
    """Runs that differ only in their seed share a row; rows of one method, model and dataset whose settings differ
    are labelled with the settings that differ among them."""
    grouped: dict[tuple, list[RunResult]] = defaultdict(list)
    for r in runs:
        grouped[(r.dataset, r.model, r.label, json.dumps(r.settings, sort_keys=True))].append(r)
    settings_of_method: dict[tuple, list[dict]] = defaultdict(list)  # one entry per row
    for key, rs in grouped.items():
        settings_of_method[key[:3]].append(rs[0].settings)
    rows = []
    for (dataset, model, label, _), rs in grouped.items():
        siblings = settings_of_method[(dataset, model, label)]
        differ = sorted({k for s in siblings for k in s if any(o.get(k) != s.get(k) for o in siblings)})
        named = ", ".join(f"{k}={_show(k, rs[0].settings.get(k))}" for k in differ)
        rows.append(Row(f"{label} ({named})" if named else label, rs[0].arch, model, dataset, rs, method=label))
    order = list(METHOD_LABELS.values())
    return sorted(rows, key=lambda r: (r.dataset, r.model, order.index(r.method) if r.method in order else 99, r.label))


COLUMNS = [("clean", "clean"), ("aa", "AA"), ("sum", "sum"), ("pgd20", "PGD-20"), ("grad_sim", "grad-sim")]


def render(rows: list[Row]) -> str:
    """Markdown: one table per dataset; columns without any value are left out."""
    out = []
    for dataset in sorted({r.dataset for r in rows}):
        part = [r for r in rows if r.dataset == dataset]
        cols = [(k, name) for k, name in COLUMNS if k in ("clean", "aa", "sum") or any(r.values(k) for r in part)]
        sim = any(k == "grad_sim" for k, _ in cols)
        paper = any(r.paper(sim) for r in part)
        header = ["model", "method", *(name for _, name in cols), "runs"]
        header += [f"seed paper (clean / AA{' / grad-sim' if sim else ''})"] if paper else []
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        for r in part:
            cells = [r.model, r.label, *(r.cell(k, 3 if k == "grad_sim" else 2) for k, _ in cols), str(len(r.runs))]
            lines.append("| " + " | ".join(cells + ([r.paper(sim)] if paper else [])) + " |")
        counts = sorted({n for r in part for run in r.runs for k, n in run.num_examples.items() if k == "aa"})
        note = f"; AutoAttack on {', '.join(map(str, counts))} test images" if counts else ""
        out += [f"### {DATASETS.get(dataset, dataset)}", "", *lines, ""]
        out.append(f"Accuracy in %, mean ± sample std over the runs of one setting (seeds){note}.")
        out.append("")
    return "\n".join(out)


MARKERS = {"resnet18": "s", "wrn34-10": "^"}


def plot(rows: list[Row], path: str | Path) -> int:
    """Clean vs AA scatter: measured rows (filled, with std error bars) beside the seed's published points for the
    same networks and methods (hollow; main-table points always, ablation and standard-training points when such
    runs were measured). Returns the number of measured points drawn (rows without AA are left out)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise TableError("--plot needs matplotlib: pip install matplotlib") from None
    measured = [r for r in rows if r.values("aa") and r.values("clean")]
    several_models = len({r.model for r in measured}) > 1
    fig, ax = plt.subplots(figsize=(7, 5.5))
    for r in measured:
        err = [statistics.stdev(r.values(k)) if len(r.values(k)) > 1 else 0 for k in ("clean", "aa")]
        marker = MARKERS.get(r.arch, "o")
        ax.errorbar(r.mean("clean"), r.mean("aa"), xerr=err[0], yerr=err[1], fmt=marker, color="C0", capsize=2)
        text = f"{r.label} ({r.model})" if several_models else r.label
        ax.annotate(text, (r.mean("clean"), r.mean("aa")), fontsize=7, xytext=(4, 3), textcoords="offset points")
    shown = {(r.arch, r.method) for r in measured}
    for (arch, label), (clean, aa, _) in PUBLISHED.items():
        optional = label in ABLATION_LABELS or label == "Std. training"
        if arch in {a for a, _ in shown} and (not optional or (arch, label) in shown):
            ax.scatter(clean, aa, marker=MARKERS[arch], facecolors="none", edgecolors="C3")
            ax.annotate(label, (clean, aa), fontsize=6, color="C3", xytext=(4, -8), textcoords="offset points")
    for arch, marker in MARKERS.items():
        if arch in {a for a, _ in shown}:
            name = "ResNet-18" if arch == "resnet18" else "WRN-34-10"
            ax.scatter([], [], marker=marker, color="C0", label=f"measured, {name} (mean ± std)")
            ax.scatter([], [], marker=marker, facecolors="none", edgecolors="C3", label=f"seed table, {name}")
    ax.set(xlabel="clean accuracy (%)", ylabel="AutoAttack accuracy (%)", title="robustness-accuracy trade-off")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return len(measured)


def table(paths: list[str]) -> list[Row]:
    return group([read_run(p) for p in run_dirs(paths)])
