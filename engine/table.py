"""`arat table`: the seed's results table from run directories, and a clean-vs-AutoAttack trade-off plot.

Rows are method x model (mean ± sample std over the runs that differ only in their seed): clean, AA and their sum
(in %), with PGD-20, the mean gradient similarity (analysis.grad_sim runs) and the seed's published numbers
(METHOD 5 and 8) when there are any. A run's method is what its config computes (an AR-AT run whose switches make
it an ablation row is tabulated as that row, whatever recipe it started from); runs of one method whose training
settings differ get a row each, labelled with the settings that tell them apart. A run's accuracies come from its
`results.json`, overridden by a later `arat eval RUN_DIR` (`eval.json`) attack by attack (AutoAttack's standard
figure, else its legacy-10 one, in a row of its own: a later legacy-10 evaluation does not replace a standard
figure); its dataset is the one training used
(`results.json` records it): a run whose real data was absent and replaced by synthetic data is tabulated as
synthetic, not beside the paper's CIFAR-10 numbers, and an evaluation of it on other data is left out (and said).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from .config import METHOD_KEYS, as_trained
from .errors import UserError, shell_word
from .recipes import ABLATION_NAMES, ABLATIONS

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
} | {f"ablation-{v}": ABLATION_NAMES[v] if v != "arat" else "AR-AT (ablation)" for v in ABLATIONS}
ABLATION_LABELS = {v for k, v in METHOD_LABELS.items() if k.startswith("ablation-")}
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
# AR-AT's (model.split_bn, method.stop_grad, method.predictor) -> the row it computes (METHOD 5)
ARAT_VARIANTS = {(split_bn, asym, asym): ABLATION_NAMES[v] for v, (split_bn, asym) in ABLATIONS.items()}
# What tells two runs' training apart, besides the seed (repeats of one setting share a row): the config without
# the sections that do not change what is trained (evaluation, speed switches, logging), without paths, and without
# the method.* keys the run's method does not read; plus the number of processes (each takes a batch of its own).
NOT_SETTINGS = {"recipe", "description", "seed", "log_every", "eval", "perf", "dist", "analysis"}
NOT_DATA_SETTINGS = {"data_dir", "backend", "synthetic_fallback", "test_subset"}


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
    unfinished: str | None = None  # "after epoch N of M": no final.pt, the figures are its latest checkpoint's
    notes: list[str] = field(default_factory=list)  # said under the table: what was left out of its row, or is unsure


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
    swa = "+SWA" if isinstance(cfg.get("swa"), dict) and cfg["swa"].get("enabled") else ""
    if switches in ARAT_VARIANTS:
        return ARAT_VARIANTS[switches] + swa
    names = ("split_bn", "stop_grad", "predictor")
    return f"AR-AT{swa} (" + ", ".join(f"{n}={str(v).lower()}" for n, v in zip(names, switches, strict=True)) + ")"


def run_label(recipe: str, cfg: dict) -> str:
    """The recipe's label where the config still computes that method, else the config's own."""
    named, own = method_label(recipe), config_label(cfg)
    if own is None or own == named or (named == "AR-AT (ablation)" and own == "AR-AT"):
        return named
    return own


def training_settings(cfg: dict, dataset: str, world_size: int | None = 1) -> dict:
    """What a run trains, flattened to dotted keys (NOT_SETTINGS and METHOD_KEYS say what is left out).
    `world_size` None: not recorded (an older engine), so not a setting that splits a row."""
    flat: dict = {} if world_size is None else {"world_size": world_size}
    cfg = as_trained(cfg)  # written by an older engine: what its run trained with
    method = cfg.get("method", {}).get("name") if isinstance(cfg.get("method"), dict) else None
    swa_on = isinstance(cfg.get("swa"), dict) and cfg["swa"].get("enabled")
    for key, value in cfg.items():
        if key in NOT_SETTINGS:
            continue
        if not isinstance(value, dict):
            flat[key] = value
            continue
        for k, v in value.items():
            if key == "data" and (k in NOT_DATA_SETTINGS or (k == "synthetic_size" and dataset != "synthetic")):
                continue
            if key == "method" and k != "name" and k not in METHOD_KEYS.get(method, {k}):
                continue
            if key == "method" and k == "init":  # a path: whether the run fine-tunes a given network, not where
                v = bool(v)
            if key == "swa" and k != "enabled" and not swa_on:
                continue
            flat[f"{key}.{k}"] = v
    dist = cfg.get("dist")  # how processes talk, not what is trained: but for synchronized BN statistics
    if world_size is not None and world_size > 1:  # (one process: nothing to synchronize)
        flat["dist.sync_bn"] = bool(isinstance(dist, dict) and dist.get("sync_bn"))
    return flat


def _show(key: str, value) -> str:
    if key.endswith(("eps", "step_size")) and isinstance(value, float):
        return f"{value * 255:.6g}/255"
    if isinstance(value, float):
        return repr(value)  # the shortest text that reads back as this number: two values never look alike
    if isinstance(value, list):
        return ",".join(_show(key, v) for v in value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def _sortable(value) -> tuple:
    """Numbers in numeric order (epochs=4 before epochs=10), lists element by element, then everything else by text."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value, ())
    if isinstance(value, list):
        return (1, 0, tuple(_sortable(v) for v in value))
    return (2, 0, (json.dumps(value, sort_keys=True),))


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
        if not path.exists():
            raise TableError(f"{path} does not exist: pass `arat train` --out dirs (or a folder of them)")
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
    from .rundir import RunDir, results_on

    files = [path / "config.json", *(path / n for n in ("results.json", "eval.json") if (path / n).exists())]
    cfg, *evaluations = (_read_json(f) for f in files)
    notes = []
    try:
        recipe, arch, configured = cfg["recipe"], cfg["model"]["arch"], cfg["data"]["dataset"]
        record = RunDir(path).training_record()  # the data it trained on, its processes (since 2026-12-02)
        dataset = record.get("dataset", configured)
        if "dataset" not in record and cfg["data"].get("synthetic_fallback") and configured != "synthetic":
            notes.append(f"{path} does not record its training data (an older engine): tabulated as {configured}, "
                         "though synthetic data may have replaced it")  # fmt: skip
        results, left_out = results_on(dataset, list(zip((f.name for f in files[1:]), evaluations, strict=True)))
        notes += [f"{path}/{name} ({other}) left out: the run trained on {dataset}" for name, other in left_out]
        others = [results.pop(k) for k in sorted(results) if k.startswith("aa-")]  # AutoAttack, other protocols
        if others and "aa" not in results:  # standard when the run has it (the leaderboard's), else legacy-10's row
            results["aa"] = others[0]
        accuracy = {k: 100 * v["accuracy"] for k, v in results.items()}
        num_examples = {k: v["num_examples"] for k, v in results.items()}
        model = model_name(cfg["model"])
        label = run_label(recipe, cfg)
        unfinished = RunDir(path).unfinished(cfg.get("epochs"))  # its figures are its latest checkpoint's
        world_size = record.get("world_size")  # (None: an older engine's run, which did not record it)
    except (KeyError, TypeError, AttributeError) as e:
        names = ", ".join(f.name for f in files)
        raise TableError(
            f"{path}: {names} lack what this engine writes ({type(e).__name__}: {e}); rewrite the results with "
            f"`arat eval {shell_word(path)}`"
        ) from None
    if not results and len(files) > 1:  # evaluated, but only on other data than it trained on
        raise TableError(f"{path} was evaluated only on other data than it trained on ({dataset}): evaluate it on "
                         f"that with `arat eval {shell_word(path)} --dataset {dataset}`")  # fmt: skip
    if not results:
        if not (path / "checkpoints" / "latest.pt").exists() and not (path / "checkpoints" / "final.pt").exists():
            raise TableError(
                f"{path} has no results and no checkpoint yet: it is still in its first epoch (wait for it) or "
                f"was interrupted (continue it with `arat train --resume {shell_word(path)}`)"
            )
        raise TableError(f"{path} has no results.json or eval.json: evaluate it with `arat eval {shell_word(path)}`")
    aa = results.get("aa")
    aa_version = {"aa_version": aa.get("version") or "standard"} if isinstance(aa, dict) else {}
    # how many test images each figure is over splits rows too: a 1,000-image AutoAttack (eval.aa_num_examples) is
    # never averaged with 10,000-image seeds, and a row that differs in it from its siblings says so
    counts = {f"{k}_images": num_examples[k] for k in ("clean", "pgd20", "aa") if k in num_examples}
    rows = RunDir(path).metrics()
    sims = [r["grad_sim"] for r in rows if isinstance(r.get("grad_sim"), int | float)]  # None: no finite step
    return RunResult(
        recipe=recipe,
        label=label,
        arch=arch,
        model=model,
        dataset=dataset,
        accuracy=accuracy,
        num_examples=num_examples,
        grad_sim=statistics.fmean(sims) if sims else None,
        # AutoAttack's protocol splits rows: legacy-10 reads robustness higher, never averaged with standard seeds
        settings=training_settings(cfg, dataset, world_size) | aa_version | counts,
        notes=notes,
        unfinished=unfinished,
    )


@dataclass
class Row:
    """One table row: the runs of one method and one training setting (its seeds) on one model and dataset."""

    label: str  # the method, plus the settings that tell this row from others of the same method, if any
    arch: str
    model: str
    dataset: str
    runs: list[RunResult]
    method: str  # the method alone (ordering, the paper's numbers)
    order: tuple  # the distinguishing settings' values, sortable: rows of one method in numeric order

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
        if not values or (key == "sum" and len(values) < len(self.runs)):  # a sum of fewer runs than clean's mean
            return "–"
        text = f"{statistics.fmean(values):.{digits}f}"
        text += f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
        fewer = key != "grad_sim" and len(values) < len(self.runs)  # e.g. some seeds not evaluated by AutoAttack
        return text + (f" ({len(values)} of {len(self.runs)} runs)" if fewer else "")

    def paper(self, with_sim: bool, ablations: bool = False) -> str:
        """The seed's published clean / AA (/ grad-sim) for this method and network, on CIFAR-10. An AR-AT row made
        from another recipe beside ablation rows (`ablations`, e.g. docs/methods.md's CPU ablation study from the
        demo recipe) gets the ablation table's AR-AT, measured with them; the main `arat-*` recipe's row keeps the
        main table's."""
        main = any(run.recipe.startswith("arat-") for run in self.runs)
        method = "AR-AT (ablation)" if ablations and self.method == "AR-AT" and not main else self.method
        published = PUBLISHED.get((self.arch, method)) if self.dataset == "cifar10" else None
        if published is None:
            return ""
        clean, aa, sim = published
        return f"{clean:.2f} / {aa:.2f}" + (f" / {sim:.2f}" if with_sim and sim is not None else "")


def _agree(a: dict, b: dict) -> bool:
    """Two settings agree on every key both have (a key an older engine did not write does not split a row)."""
    return all(a[k] == b[k] for k in a.keys() & b.keys())


def _kind(r: RunResult) -> tuple:
    return r.dataset, r.model, r.label, r.unfinished  # an unfinished run's figures: a row apart


def group(runs: list[RunResult]) -> list[Row]:
    """Runs that differ only in their seed share a row; rows of one method, model and dataset whose settings differ
    are labelled with the settings that differ among them."""
    groups: list[list[RunResult]] = []
    for r in sorted(runs, key=lambda r: -len(r.settings)):  # complete settings first (equal ones: one group)
        fits = [g for g in groups if _kind(g[0]) == _kind(r) and all(_agree(o.settings, r.settings) for o in g)]
        if len(fits) == 1:  # a run an older engine recorded less of joins a row only where it fits no other
            fits[0].append(r)
        else:
            groups.append([r])
    merged = [{k: v for r in g for k, v in r.settings.items()} for g in groups]  # a row's settings, all its runs'
    rows = []
    for g, settings in zip(groups, merged, strict=True):
        siblings = [m for h, m in zip(groups, merged, strict=True) if _kind(h[0]) == _kind(g[0])]
        differ = sorted({k for a in siblings for b in siblings for k in a.keys() & b.keys() if a[k] != b[k]})
        if all(m.get("pgd20_images") == m.get("clean_images") for m in siblings):  # (said once, as clean's)
            differ = [k for k in differ if k != "pgd20_images"]
        shown = differ + (["aa_version"] if settings.get("aa_version", "standard") != "standard" else [])
        # legacy-10 reads robustness higher: its rows say so even where no sibling differs
        named = ", ".join(f"{k}={_show(k, settings[k]) if k in settings else '?'}" for k in dict.fromkeys(shown))
        label = g[0].label if not g[0].unfinished else f"{g[0].label} (unfinished: {g[0].unfinished})"
        if named:  # "AR-AT (split_bn=...; epochs=4)", not two brackets
            label = f"{label[:-1]}; {named})" if label.endswith(")") else f"{label} ({named})"
        values = tuple(_sortable(settings.get(k)) for k in differ)
        rows.append(Row(label, g[0].arch, g[0].model, g[0].dataset, g, method=g[0].label, order=values))
    order = list(METHOD_LABELS.values())
    rank = {label: i for i, label in enumerate(order)}

    def place(r: Row) -> tuple:  # the seed's method order; an unfinished run after its method's finished rows
        return r.dataset, r.model, rank.get(r.method, len(order)), r.method, r.runs[0].unfinished is not None, r.order

    return sorted(rows, key=place)


COLUMNS = [("clean", "clean"), ("aa", "AA"), ("sum", "sum"), ("pgd20", "PGD-20"), ("grad_sim", "grad-sim")]


def render(rows: list[Row]) -> str:
    """Markdown: one table per dataset; columns without any value are left out."""
    out = []
    for dataset in sorted({r.dataset for r in rows}):
        part = [r for r in rows if r.dataset == dataset]
        cols = [(k, name) for k, name in COLUMNS if k in ("clean", "aa", "sum") or any(r.values(k) for r in part)]
        sim = any(k == "grad_sim" for k, _ in cols)
        ablated = {r.arch for r in part if r.method in ABLATION_LABELS}  # networks with ablation rows here
        paper = any(r.paper(sim, r.arch in ablated) for r in part)
        header = ["model", "method", *(name for _, name in cols), "runs"]
        header += [f"seed paper (clean / AA{' / grad-sim' if sim else ''})"] if paper else []
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        for r in part:
            cells = [r.model, r.label, *(r.cell(k, 3 if k == "grad_sim" else 2) for k, _ in cols), str(len(r.runs))]
            lines.append("| " + " | ".join(cells + ([r.paper(sim, r.arch in ablated)] if paper else [])) + " |")
        # PGD-20 on as many images as clean (one `arat eval` evaluates both on the same): said together
        pgd_apart = any("pgd20" in run.num_examples and run.num_examples["pgd20"] != run.num_examples.get("clean")
                        for r in part for run in r.runs)  # fmt: skip
        note = _images_note(part, "clean", "clean" if pgd_apart else "clean and PGD-20")
        note += (_images_note(part, "pgd20", "PGD-20") if pgd_apart else "") + _images_note(part, "aa", "AutoAttack")
        out += [f"### {DATASETS.get(dataset, dataset)}", "", *lines, ""]
        out.append(f"Accuracy in %, mean ± sample std over the runs of one setting (seeds){note}.")
        out.append("")
    notes = [n for r in rows for run in r.runs for n in run.notes]
    return "\n".join(out + ([f"Notes: {'; '.join(notes)}.", ""] if notes else []))


def _images_note(rows: list[Row], attack: str, what: str) -> str:
    """The note's "; AutoAttack on 10000 test images", naming the rows of each count where rows' counts differ."""
    by_count: dict[int, list[str]] = {}
    several_models = len({r.model for r in rows}) > 1
    for r in rows:
        for n in sorted({run.num_examples[attack] for run in r.runs if attack in run.num_examples}):
            by_count.setdefault(n, []).append(f"{r.model} {r.label}" if several_models else r.label)
    if len(by_count) <= 1:
        return "".join(f"; {what} on {n} test images" for n in by_count)
    parts = [f"{n} test images ({', '.join(names)})" for n, names in sorted(by_count.items())]
    return f"; {what} on " + ", on ".join(parts)


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
    several_datasets = len({r.dataset for r in measured}) > 1
    fig, ax = plt.subplots(figsize=(7, 5.5))
    for r in measured:
        err = [statistics.stdev(r.values(k)) if len(r.values(k)) > 1 else 0 for k in ("clean", "aa")]
        marker = MARKERS.get(r.arch, "o")
        ax.errorbar(r.mean("clean"), r.mean("aa"), xerr=err[0], yerr=err[1], fmt=marker, color="C0", capsize=2)
        where = [r.model] * several_models + [DATASETS.get(r.dataset, r.dataset)] * several_datasets
        text = f"{r.label} ({', '.join(where)})" if where else r.label
        ax.annotate(text, (r.mean("clean"), r.mean("aa")), fontsize=7, xytext=(4, 3), textcoords="offset points")
    shown = {(r.arch, r.method) for r in measured if r.dataset == "cifar10"}  # the seed's points are CIFAR-10's
    for (arch, label), (clean, aa, _) in PUBLISHED.items():
        optional = label in ABLATION_LABELS or label == "Std. training"
        if arch in {a for a, _ in shown} and (not optional or (arch, label) in shown):
            ax.scatter(clean, aa, marker=MARKERS[arch], facecolors="none", edgecolors="C3")
            ax.annotate(label, (clean, aa), fontsize=6, color="C3", xytext=(4, -8), textcoords="offset points")
    for arch, marker in MARKERS.items():
        name = "ResNet-18" if arch == "resnet18" else "WRN-34-10"
        if arch in {r.arch for r in measured}:
            ax.scatter([], [], marker=marker, color="C0", label=f"measured, {name} (mean ± std)")
        if arch in {a for a, _ in shown}:
            seed = f"seed table (CIFAR-10), {name}"
            ax.scatter([], [], marker=marker, facecolors="none", edgecolors="C3", label=seed)
    ax.set(xlabel="clean accuracy (%)", ylabel="AutoAttack accuracy (%)", title="robustness-accuracy trade-off")
    ax.grid(alpha=0.3)
    if measured:  # with no run evaluated by AutoAttack the plot is empty: no legend (matplotlib would warn)
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return len(measured)


def table(paths: list[str]) -> list[Row]:
    return group([read_run(p) for p in run_dirs(paths)])
