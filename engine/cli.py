"""`arat`: train, evaluate, export, tabulate results, list recipes, fetch data.

Bad input (unknown recipe, bad --set, missing data, unusable output directory, unreadable checkpoint) ends with one
line on stderr and exit status 2; nothing is half-written.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import torch

from .config import (
    ConfigError,
    DataConfig,
    EvalConfig,
    ModelConfig,
    TrainConfig,
    apply_overrides,
    default_data_dir,
    flat,
)
from .errors import CompiledEvaluationFailed, UserError, innermost, shell_word
from .progress import close_bars
from .recipes import RECIPES, get_recipe


def _add_data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None, type=os.path.expanduser,  # (`--data-dir=~/x`: no shell expands it)
                   help="dataset root (default: $ARAT_DATA_DIR or ./data)")  # fmt: skip


class VersionAction(argparse.Action):
    """`--version`, its line built only when asked for (it runs git)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from .rundir import version_line

        print(version_line())  # stdout, as argparse's own "version" action writes
        parser.exit()


class OneLineParser(argparse.ArgumentParser):
    """A bad option or value is one line (argparse prints the whole usage above it), exit status 2. Subcommands'
    parsers are of the same class (add_subparsers makes its parsers of the parent's)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the options)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="arat", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action=VersionAction, help="show arat's version and commit, torch's and triton's")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a recipe, then evaluate it")
    p.add_argument("--recipe", help="recipe name (`arat recipes`; e.g. demo); required unless --resume")
    _add_data_dir(p)
    p.add_argument("--out", help="run directory (default: runs/<recipe>-<time>)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config field, repeatable (e.g. --set train.epochs=5 --set attack.eps=8/255); "
        "sections: train, data, model, attack, method, optim, swa, eval, perf, dist, analysis "
        "(`arat recipes --show NAME` lists every key)",
    )
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its latest checkpoint; "
                   "its --set may change only perf.*, dist.* (not dist.sync_bn), eval.chunk_size and "
                   "eval.batch_size (--data-dir: where its data is now)")  # fmt: skip
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation at the end")
    p.add_argument("--init", metavar="CHECKPOINT", help="ARREST: fine-tune this checkpoint or run (no standard stage)")

    p = sub.add_parser("recipes", help="list recipes (--show NAME: one recipe's every setting)")
    p.add_argument("--show", metavar="NAME", help="print a recipe's resolved config (every key --set takes)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="with --show: the config after these overrides")  # fmt: skip

    p = sub.add_parser("eval", help="evaluate a run, a checkpoint, or a plain state_dict")
    p.add_argument("target", metavar="RUN_OR_CHECKPOINT")
    p.add_argument("--attacks", default="clean,pgd20,aa", help="comma list of clean, pgd20, aa")
    p.add_argument("--num-examples", type=int, default=None, help="first N test images (default 10000)")
    p.add_argument("--aa-num-examples", type=int, default=None, help="first N for AutoAttack (default: same)")
    p.add_argument("--batch-size", type=int, default=1000, help="at most this many images per forward")
    p.add_argument("--model", choices=["resnet18", "wrn34-10"], help="architecture of a plain state_dict")
    p.add_argument("--width", type=int, default=64, help="ResNet-18 width of a plain state_dict")
    p.add_argument("--dataset", choices=["cifar10", "cifar100"], default=None)
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--compile",
        choices=["auto", "on", "off"],
        default=None,
        help="torch.compile the classifier (default: the run's perf.compile; auto: on for CUDA)",
    )
    p.add_argument("--aa-version", choices=["standard", "legacy-10"], default="standard",
                   help="standard: the leaderboard protocol; legacy-10: torchattacks' AutoAttack (APGD at 10 "
                   "iterations), the protocol of the code the AR-AT paper used")  # fmt: skip
    p.add_argument("--chunk-size", type=int, default=0, help="images per chunk (own seed, saved when done); "
                   "0: sized for the device (500 on a CPU, up to 1000 on a GPU, by its memory)")  # fmt: skip
    p.add_argument("--seed", type=int, default=None, help="base seed of the attacks (default: the run's seed, or 0)")
    p.add_argument("--out", metavar="DIR", help="evaluation record and finished chunks (default: RUN/eval, or "
                   "CHECKPOINT.eval/ beside a checkpoint); a rerun skips the chunks already there")  # fmt: skip
    _add_data_dir(p)

    p = sub.add_parser("table", help="results table (markdown) and trade-off plot from run directories")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="runs (or directories of runs) with results")
    p.add_argument("--out", metavar="TABLE.md", help="also write the markdown here")
    p.add_argument("--plot", metavar="PLOT.png", help="clean-vs-AA scatter beside the seed's published points")

    p = sub.add_parser("export", help="write the plain network (single BN holding the adv-BN statistics)")
    p.add_argument("target", metavar="RUN_OR_CHECKPOINT")
    p.add_argument("out", metavar="OUT.pt")

    p = sub.add_parser("data", help="dataset tools")
    data = p.add_subparsers(dest="data_command", required=True)
    d = data.add_parser("download", help="fetch the official archive, verify its MD5, extract it")
    d.add_argument("--dataset", choices=["cifar10", "cifar100"], default="cifar10")
    _add_data_dir(d)
    d.add_argument("--url", help="alternative source (e.g. file:///path/cifar-10-python.tar.gz)")
    d.add_argument("--md5", help="expected MD5 (default: the published one)")
    d = data.add_parser("ffcv", help="write train/test .beton files from the official layout")
    d.add_argument("--dataset", choices=["cifar10", "cifar100"], default="cifar10")
    _add_data_dir(d)
    d.add_argument(
        "--out",
        help="where to write (default: the cache that `--set data.backend=ffcv` reads, "
        "$ARAT_CACHE_DIR/ffcv or ~/.cache/arat/ffcv)",
    )
    return parser


def cmd_recipes(args) -> None:
    if args.show:  # every key and its value, as `--set section.key=value` names them (train.* at the top level)
        shown = apply_overrides(get_recipe(args.show), args.overrides).to_dict()
        train = {k: shown.pop(k) for k in list(shown) if not isinstance(shown[k], dict)}
        print(json.dumps({"train": train} | shown, indent=2))
        return
    if args.overrides:
        raise ConfigError("--set goes with --show NAME (the recipe it changes)")
    width = max(map(len, RECIPES))
    for name, (_, description) in RECIPES.items():
        print(f"{name:<{width}}  {description}")


def resume_takes(key: str) -> bool:
    """The --set keys a resume takes: how and where the run goes on, not what it trains (synchronized BN statistics
    are what it trains); the closing evaluation's chunk and forward sizes (memory, not results: a smaller chunk is
    the way past an evaluation that ran out of memory)."""
    how = key.startswith(("perf.", "dist.")) and key != "dist.sync_bn"
    return how or key in ("eval.chunk_size", "eval.batch_size")


def cmd_train(args) -> None:
    import dataclasses

    from .train import load_run_config, run_training

    if args.resume is not None and not args.resume.strip():
        raise ConfigError("--resume is empty: name the run directory to continue")
    if args.resume:
        if args.recipe or args.init:
            raise ConfigError("--resume continues a run with its saved config.json: drop --recipe and --init")
        if args.out is not None:
            raise ConfigError(f"--resume continues {args.resume} in place: drop --out")
        # how and where the run goes on (another machine, its switches), never what it trains: kept in config.json
        how = [o for o in args.overrides if resume_takes(o.partition("=")[0].strip())]
        if len(how) != len(args.overrides):
            raise ConfigError("--resume continues a run with its saved config.json: of --set it takes only perf.*, "
                              "dist.* (not dist.sync_bn) and eval.chunk_size / eval.batch_size (how and where it "
                              "runs: perf.device=cpu...), not what it trains")  # fmt: skip
        moved = [f"data.data_dir={os.path.abspath(args.data_dir)}"] if args.data_dir else []  # (moved: absolute)
        cfg, out = load_run_config(args.resume), args.resume
        cfg = apply_overrides(cfg, moved + how) if moved or how else cfg
    else:
        if not args.recipe:
            raise ConfigError("train needs --recipe NAME (or --resume RUN_DIR); `arat recipes` lists recipes")
        cfg = get_recipe(args.recipe)
        overrides = ([f"data.data_dir={args.data_dir}"] if args.data_dir else []) + args.overrides
        if args.init:
            from .methods.arrest import init_overrides

            overrides = init_overrides(cfg, args.init) + overrides
        cfg = apply_overrides(cfg, overrides)
        if args.out is not None and not args.out.strip():
            raise ConfigError("--out is empty: name a run directory, or leave --out out for runs/<recipe>-<time>")
        out = args.out or f"runs/{args.recipe}-{time.strftime('%Y%m%d-%H%M%S')}"
        # recorded absolute: `arat eval RUN` or a resume from another folder reads the same data (a relative one
        # was read from there: not found, or the synthetic stand-in where the recipe falls back to it)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data_dir=os.path.abspath(cfg.data.data_dir)))
    resume = bool(args.resume)
    if not resume and args.out is not None and (Path(out) / "config.json").is_file():
        check_same_run(cfg, out)  # the same command again (a scheduler's requeue, a rerun): it continues the run
        resume = True
    args.run_dir = out  # named by main() if the run is interrupted
    run_training(cfg, out, resume=resume, evaluate_at_end=not args.no_eval)


def check_same_run(cfg: TrainConfig, out: str) -> None:
    """`arat train --recipe X --out RUN` where RUN holds a run already (a scheduler requeueing the job, torchrun
    restarting it, the command typed again): it is continued (as `--resume RUN` does) when it trains what this
    command would, by every key a resume does not take (`resume_takes`: perf.*, dist.*, the evaluation's sizes,
    and the data folder are this command's); else refused in one line naming the first key that differs."""
    from .rundir import RunDirError
    from .train import load_run_config

    saved, new = flat(load_run_config(out)), flat(cfg)
    differs = [k for k in new if not resume_takes(k) and k != "data.data_dir" and new[k] != saved.get(k)]
    if differs:
        key = differs[0].removeprefix("train.")
        resume = f"`arat train --resume {shell_word(out)}`"
        raise RunDirError(f"{out} already holds a run with other settings ({key}: {saved.get(differs[0])!r} there, "
                          f"{new[differs[0]]!r} here): continue it with {resume}, or pick another --out")  # fmt: skip
    if os.environ.get("RANK", "0") == "0":
        print(f"arat: {out} holds this run (the same recipe and settings): continuing it, as `arat train --resume "
              f"{shell_word(out)}` does")  # fmt: skip


def resolve_target(target: str) -> tuple[Path, TrainConfig | None]:
    """(checkpoint file, its run config if it belongs to a run)."""
    from .models import CheckpointError
    from .rundir import RunDir
    from .train import load_run_config

    path = Path(target)
    if path.is_dir():
        cfg = load_run_config(path)
        if (checkpoint := run_checkpoint(path)) is not None:
            if stage := RunDir(path).unfinished(cfg.epochs):  # said, not silent: an unfinished network's figures
                print(f"arat: {path} has not finished: using its latest checkpoint ({stage})", file=sys.stderr)
            return checkpoint, cfg
        raise CheckpointError(
            f"{path} has no checkpoint yet: one is written when its first epoch ends; wait for that, or continue "
            f"an interrupted run with `arat train --resume {shell_word(path)}`"
        )
    if not path.exists():
        raise CheckpointError(f"{path}: no such run directory or checkpoint")
    return path, None


def read_target_weights(ckpt_path: Path, of_a_run: bool, target: str) -> tuple[dict, dict | None]:
    """`read_weights` of what `resolve_target` found; a run's unreadable final.pt names the resume that makes it
    again from the last epoch's checkpoint, without training."""
    from .models import CheckpointError, read_weights
    from .rundir import FINAL, LATEST

    try:
        return read_weights(ckpt_path)
    except CheckpointError as e:
        if not of_a_run or ckpt_path.name != FINAL or not ckpt_path.with_name(LATEST).exists():
            raise
        raise CheckpointError(
            f"{e}: delete it, then `arat train --resume {shell_word(target)}` writes it again"
        ) from None


def load_for_eval(args) -> tuple[torch.nn.Module, TrainConfig]:
    """The network to evaluate (Split-BN from a run/engine checkpoint, or plain from a bare state_dict)."""
    from .config import from_dict
    from .models import CheckpointError, build_model, export_state_dict, load_plain

    ckpt_path, run_cfg = resolve_target(args.target)
    state, saved = read_target_weights(ckpt_path, run_cfg is not None, args.target)
    if saved is not None or run_cfg is not None:
        cfg = run_cfg or from_dict(saved, f"{ckpt_path} (its config)")
        model = build_model(cfg.model, cfg.data.num_classes)
        load_plain(model, state, str(ckpt_path))
        return model, cfg
    classes = None
    if args.model:
        model_cfg = ModelConfig(arch=args.model, width=args.width, split_bn=False)
    else:  # an exported network (or one named like it): its weights' names and shapes say which
        from .hub import infer_config

        try:
            model_cfg, classes = infer_config(export_state_dict(state))
        except CheckpointError:
            raise ConfigError(f"{ckpt_path} is a plain state_dict of a network this engine cannot name from its "
                              "weights: say which with --model resnet18|wrn34-10 (and --width)") from None  # fmt: skip
    # the data it was made for: --dataset, else the model_info `arat export` wrote beside it, else its class count
    exported = exported_dataset(ckpt_path)
    dataset = args.dataset or exported or ("cifar100" if classes == 100 else "cifar10")
    if exported is None:  # another tool's weights, maybe: said once the evaluation starts (cmd_eval)
        args.input_note = (f"{ckpt_path} is a state_dict without this engine's config: it is fed [0, 1] images with "
                           "no mean/std normalization, as this engine trains; weights trained on normalized images "
                           "read near chance here")  # fmt: skip
    cfg = TrainConfig(model=model_cfg, data=DataConfig(dataset=dataset))
    model = build_model(cfg.model, classes or cfg.data.num_classes)
    load_plain(model, export_state_dict(state), str(ckpt_path))  # a Split-BN state_dict saved alone: its adv BNs
    return model, cfg


def exported_dataset(weights: Path) -> str | None:
    """The dataset in the model_info JSON `arat export` wrote beside `weights`, if any (cifar10 or cifar100)."""
    from .hub import info_path
    from .rundir import read_json_or_none

    info = read_json_or_none(info_path(weights))
    dataset = info.get("dataset") if isinstance(info, dict) else None
    return dataset if dataset in ("cifar10", "cifar100") else None


def eval_config(args) -> EvalConfig:
    """`arat eval`'s flags as an EvalConfig, validated before anything is loaded; a bad number is said with the flag
    typed, not the config key behind it."""
    flags = {"--num-examples": (args.num_examples, ""), "--batch-size": (args.batch_size, ""),
             "--aa-num-examples": (args.aa_num_examples, " (0: as --num-examples)"),
             "--chunk-size": (args.chunk_size, " (0: sized for the device)")}  # fmt: skip
    for flag, (value, zero) in flags.items():
        if value is not None and value < (0 if zero else 1):
            raise ConfigError(f"{flag} {value}: give at least {0 if zero else 1}{zero}")
    return EvalConfig(
        attacks=args.attacks,
        num_examples=10000 if args.num_examples is None else args.num_examples,
        aa_num_examples=args.aa_num_examples or 0,
        batch_size=args.batch_size,
        aa_version=args.aa_version,
        chunk_size=args.chunk_size,
    )


def cmd_eval(args) -> None:
    import dataclasses

    from . import distributed
    from .config import DistConfig
    from .data import DataError, data_notice, data_source, load_test_split, resolve_dataset
    from .evaluate import evaluate, format_results, summary
    from .perf import forget_compiled_roles, make_current, resolve_device
    from .rundir import RunDirError, environment

    eval_cfg = eval_config(args)
    if args.out is not None and not args.out.strip():
        raise ConfigError("--out is empty: name a directory, or leave --out out for the default")
    device = resolve_device(args.device)
    target = Path(args.target)
    if target.is_dir() and (target / "config.json").exists() and int(os.environ.get("RANK", "0")) == 0:
        try:
            writable_now(target)  # before the evaluation's minutes or hours: its eval.json goes into the run
        except RunDirError as e:
            if int(os.environ.get("WORLD_SIZE", "1")) == 1:
                raise
            # under torchrun said by every rank, at the first gather of the group they all join: raised before it,
            # it left the others in the group's start (deaf to SIGTERM) until torchrun killed them
            info = distributed.init(DistConfig(), device.type)
            try:
                distributed.check_same_data(e, "", info)  # raises it, on every rank
            finally:
                distributed.shutdown(info, wait=False)
    network = run_network(target)  # before it is read: compared when the results go into the run
    model, cfg = load_for_eval(args)
    data_cfg = apply_overrides(cfg, [f"data.dataset={args.dataset}"] if args.dataset else []).data
    if args.data_dir:
        data_cfg.data_dir = args.data_dir
    if data_cfg.num_classes != (classes := output_classes(model)):
        told = f"--dataset {args.dataset}" if args.dataset else f"{data_cfg.dataset} (the run's or its model_info's)"
        raise ConfigError(f"{told}: {data_cfg.num_classes} classes, but the network has {classes} outputs; "
                          "evaluate it on the data it was trained for (--dataset)")  # fmt: skip
    record = Path(args.out) if args.out else target / "eval" if target.is_dir() else target.with_suffix(".eval")
    dataset = resolve_dataset(data_cfg)  # synthetic where the real data was absent and the fallback allowed it
    if (notice := data_notice(data_cfg, dataset)) and int(os.environ.get("RANK", "0")) == 0:
        print(f"arat eval: {notice}", file=sys.stderr)  # (as `arat train` says it)
    try:
        split, missing = load_test_split(data_cfg, cfg.seed, dataset), None
    except DataError as e:  # under torchrun said on every rank, below (a node without the data)
        split, missing = None, e
    # under torchrun: the chunks are shared among the ranks (the collectives bounded by the run's timeout; the
    # gathers of finished chunks by the chunks' own time, evaluate._attack_result)
    info = distributed.init(DistConfig(timeout_min=cfg.dist.timeout_min), device.type)
    try:  # this rank leaves its group at once on an error, marking the exchange it will not reach
        test_data = None if missing else split.fingerprint()  # which test images (another copy has the same name)
        # each rank evaluates its chunks on its own node's copy: the flags of two copies must not mix
        distributed.check_same_data(missing or {"test images": test_data}, data_source(data_cfg), info)
        device = distributed.local_device(info, device)
        make_current(device)
        for note in (getattr(args, "input_note", None), distributed.idle_gpus_note(info, device)):
            if note and info.is_main:
                print(f"arat eval: note: {note}", file=sys.stderr)
        seed = cfg.seed if args.seed is None else args.seed
        graphs = cfg.perf.cuda_graphs if device.type == "cuda" else "auto"  # a GPU run's `on` must not stop a CPU one
        perf_cfg = dataclasses.replace(cfg.perf, device=str(device), compile=args.compile or cfg.perf.compile,
                                       cuda_graphs=graphs)  # fmt: skip
        results = evaluate(model.to(device), split, eval_cfg, device, seed, perf_cfg, info, record)
    except BaseException:
        distributed.shutdown(info, wait=False)
        raise
    finally:  # (another evaluation in this process compiles its own)
        forget_compiled_roles()
    distributed.shutdown(info)
    if not info.is_main:
        return
    print(f"{args.target}: {format_results(results)}")  # printed first: a failed write below loses nothing
    env = environment(device) | {"world_size": info.world_size}
    entry = {"target": str(target.resolve()), "dataset": dataset, "test_data": test_data, "results": summary(results),
             "environment": env, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip
    write_evaluation(target, record, results, entry, network)


def run_checkpoint(run: Path) -> Path | None:
    """The checkpoint of a run directory that its evaluation reads: final.pt (SWA's averaged network), else
    latest.pt; None where it has neither."""
    from .rundir import FINAL, LATEST

    return next((p for p in (run / "checkpoints" / n for n in (FINAL, LATEST)) if p.exists()), None)


def run_network(run: Path) -> tuple | None:
    """Which network a run directory holds now: `run_checkpoint`'s, by name and file identity (each is written whole
    under a new name, then renamed over the old); None for a checkpoint file or a run without one."""
    checkpoint = run_checkpoint(run) if run.is_dir() else None
    if checkpoint is None:
        return None
    with contextlib.suppress(FileNotFoundError):  # (removed since it was found)
        st = os.stat(checkpoint)
        return checkpoint.name, st.st_ino, st.st_size, st.st_mtime_ns
    return None


def write_evaluation(target: Path, record: Path, results: dict, entry: dict, network: tuple | None = None) -> None:
    """The evaluation's flags and record into `record`, and its summary merged into the run's eval.json when
    `target` is a run directory. `network`: `run_network(target)` when its network was read; where the run holds
    another one by the end (trained on meanwhile: `arat eval` holds no lock while it evaluates, so a resume may
    start), the results are of the network it held before and are not merged into the run, said in one line."""
    from .evaluate import write_flags
    from .locks import held_if_possible
    from .rundir import RunDir, RunDirError, RunDirInUse, atomic_json

    def write_record() -> None:
        write_flags(record, results)
        (record / "records").mkdir(exist_ok=True)
        # the process in the name: two evaluations ending in the same second keep both records
        atomic_json(record / "records" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json", entry)

    in_run = target.is_dir() and record.resolve().is_relative_to(target.resolve())
    if not in_run:  # a record folder of its own (--out, or beside a checkpoint file): its own lock, not the run's
        # (two evaluations ending together each merged into flags.json as read before the other wrote: one's lost)
        with held_if_possible(record / ".lock", EVAL_LOCK_WAIT_S):
            write_record()
    if not target.is_dir():
        return
    # the run's files are written under its lock: two evaluations of one run at once each merged into flags.json as
    # read before the other wrote (one's entry lost). Another holder gets a minute to let go; then the results
    # (printed above) wait for a rerun, which finds every chunk saved
    try:
        with RunDir(target).open_for_writing(resume=True, wait_s=EVAL_LOCK_WAIT_S) as rundir:
            if network is not None and (now := run_network(target)) != network:
                held = "none" if now is None else now[0] if now[0] != network[0] else f"another {now[0]}"
                raise RunDirError(
                    f"{target} holds another network than the one evaluated ({network[0]}; now: {held}, written while "
                    "it was evaluated: the run trained on meanwhile): the results above are of the network it held "
                    "before and were not written into the run; the same `arat eval` again evaluates the one it holds"
                )
            if in_run:
                write_record()
            now = entry["dataset"], entry["results"], entry["test_data"]
            rundir.write_json("eval.json", merged_evaluation(rundir.path / "eval.json", *now))
    except RunDirInUse as e:
        raise RunDirError(f"{e}: the results above were not written into the run; the same `arat eval` again "
                          "writes them in seconds (every chunk is saved)") from None  # fmt: skip


EVAL_LOCK_WAIT_S = 60.0  # how long an ending `arat eval` waits for another holder of its run's lock


def writable_now(run: Path) -> None:
    """`arat eval RUN` writes RUN/eval.json at its end: a run in use (still training) or read-only is refused before
    anything is evaluated (it was refused after the whole evaluation, whose chunks a retry then redid)."""
    from .rundir import LATEST, RunDir, RunDirError, RunDirInUse

    network = run_checkpoint(run) or run / "checkpoints" / LATEST  # SWA's: final.pt
    apart = f"to evaluate its network without writing there: arat eval {shell_word(network)} --out DIR"
    unwritable = f"arat eval {run} writes {run / 'eval.json'}, which arat table reads; {apart}"
    try:
        with RunDir(run).open_for_writing(resume=True, unwritable=unwritable):
            pass
    except RunDirInUse as e:
        raise RunDirError(f"{e} ({unwritable})") from None


def output_classes(model: torch.nn.Module) -> int:
    """The classes a network tells apart: its last linear layer's outputs."""
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1].out_features


def merged_evaluation(path: Path, dataset: str, results: dict, test_data: str | None = None) -> dict:
    """RUN/eval.json with this evaluation's attacks replacing their earlier entries: `arat eval RUN --attacks clean`
    after an evaluation of AutoAttack kept only clean (the AutoAttack figure vanished from `arat table`); each
    AutoAttack protocol has its own entry. An eval.json on other data (another dataset, or other test images under
    the same name: `test_data`, their fingerprint) is replaced whole (its figures stay in eval/records/)."""
    from .rundir import by_protocol, fewer_images_of_the_same_network, read_json_or_none

    earlier = read_json_or_none(path)
    same = isinstance(earlier, dict) and earlier.get("dataset") == dataset and isinstance(earlier.get("results"), dict)
    same = same and earlier.get("test_data") in (None, test_data)  # (an older eval.json does not say)
    merged = by_protocol(earlier["results"]) if same else {}  # each AutoAttack protocol's figure apart
    for attack, result in results.items():  # a rerun of the same weights on fewer images keeps the fuller figure
        if not fewer_images_of_the_same_network(result, merged.get(attack)):
            merged[attack] = result
    return {"dataset": dataset, "results": merged} | ({"test_data": test_data} if test_data else {})


PLOT_FORMATS = ("png", "pdf", "svg", "svgz", "jpg", "jpeg", "eps", "ps", "tif", "tiff", "webp")  # matplotlib's Agg


def cmd_table(args) -> None:
    from .table import TableError, plot, render, table

    for out in filter(None, (args.out, args.plot)):
        if not Path(out).parent.is_dir():
            raise TableError(f"{Path(out).parent} does not exist; create it or pick another path for {out}")
        if Path(out).is_dir():
            raise TableError(f"{out} is a directory: name the file to write, e.g. {Path(out) / 'table.md'}")
    if args.out and Path(args.out).is_file() and Path(args.out).suffix.lower() not in (".md", ".markdown", ".txt"):
        raise TableError(f"{args.out} exists and is not a markdown file (a run's results?): pick a .md path")
    if args.plot and Path(args.plot).suffix.lower().lstrip(".") not in PLOT_FORMATS:
        raise TableError(f"--plot {args.plot}: name a .png, .pdf or .svg file (formats: {', '.join(PLOT_FORMATS)})")
    rows = table(args.runs)
    markdown = render(rows)
    print(markdown)
    if args.out and Path(args.out).exists() and not Path(args.out).is_file():  # a device or a pipe: written to
        Path(args.out).write_text(markdown + "\n")
    elif args.out:
        from .rundir import atomic_write

        atomic_write(Path(args.out), lambda f: f.write((markdown + "\n").encode()))
    if args.plot:
        drawn = plot(rows, args.plot)
        print(f"wrote {args.plot} ({drawn} measured points; runs without AutoAttack are left out)")


def cmd_export(args) -> None:
    from .config import from_dict
    from .models import build_model, export_state_dict, load_plain
    from .rundir import RunDirError, atomic_json, atomic_write

    out = Path(args.out)
    if out.is_dir():
        raise RunDirError(f"{out} is a directory: name the file to write, e.g. {out / 'model.pt'}")
    if not out.parent.is_dir():
        raise RunDirError(f"{out.parent} does not exist; create it or pick another OUT.pt")
    ckpt_path, run_cfg = resolve_target(args.target)
    state, saved = read_target_weights(ckpt_path, run_cfg is not None, args.target)
    from .hub import info_path

    plain, cfg = export_state_dict(state), None
    if saved is not None or run_cfg is not None:  # check it loads into the plain network before writing
        cfg = run_cfg or from_dict(saved, f"{ckpt_path} (its config)")
        load_plain(build_model(cfg.model, cfg.data.num_classes, split_bn=False), plain, str(ckpt_path))
    else:  # a plain state_dict: into the network its names say (as engine.hub.load_model will load it)
        from .hub import plain_network

        plain_network(plain, str(ckpt_path))
    if info_path(out).resolve() == out.resolve():
        raise RunDirError(f"{out}: its model_info ({info_path(out).name}) would overwrite the weights; name it e.g. "
                          f"{out.with_suffix('.pt')}")  # fmt: skip
    for path in (out, info_path(out)):  # a run's config.json or results.json, an earlier export: never replaced
        if path.exists():
            raise RunDirError(f"{path} exists: export writes {out.name} and {info_path(out).name}; remove them first "
                              "or name another OUT.pt")  # fmt: skip
    info = model_info(Path(args.target), cfg, plain)
    atomic_write(out, lambda f: torch.save(plain, f))
    atomic_json(info_path(out), info)
    print(f"wrote {out} ({len(plain)} tensors; plain network with the adv-BN statistics) and {info_path(out)}")


def model_info(target: Path, cfg: TrainConfig | None, plain: dict) -> dict:
    """RobustBench-shaped model_info (strings with two decimals, as its JSON files hold them), with the figures of
    the run's latest evaluation when `target` is a run directory, plus what `engine.hub.load_model` needs."""
    from .hub import infer_config
    from .rundir import RunDir, read_json_or_none, results_on

    arch_cfg, classes = infer_config(plain)
    dataset = cfg.data.dataset if cfg else "cifar100" if classes == 100 else "cifar10"  # a plain file: its classes
    dataset = RunDir(target).training_record().get("dataset", dataset) if target.is_dir() else dataset
    evaluations = []
    for name in ("results.json", "eval.json") if target.is_dir() else ():  # eval.json (a later `arat eval`) overrides
        found = read_json_or_none(target / name)
        if isinstance(found, dict) and isinstance(found.get("results"), dict):
            evaluations.append((name, found))
    results, _ = results_on(dataset, evaluations)  # evaluations on other data than the training's are left out
    results = {  # an entry of another shape (a hand-edited or older file) is left out, not a traceback
        k: v for k, v in results.items()
        if isinstance(v, dict) and isinstance(v.get("accuracy"), int | float) and isinstance(v.get("num_examples"), int)
    }  # fmt: skip

    def pct(name: str) -> str:
        return f"{100 * results[name]['accuracy']:.2f}" if name in results else ""

    aa = results.get("aa", {})
    architecture = "WideResNet-34-10" if arch_cfg.arch == "wrn34-10" else "ResNet-18"
    if arch_cfg.arch == "resnet18" and arch_cfg.width != 64:
        architecture += f" (width {arch_cfg.width})"
    note = f"AutoAttack {aa.get('version', 'standard')} on the first {aa['num_examples']} test images" if aa else ""
    if target.is_dir() and cfg and (stage := RunDir(target).unfinished(cfg.epochs)):
        note = "; ".join(filter(None, [f"an unfinished run's latest checkpoint ({stage})", note]))
    return {
        "name": cfg.recipe if cfg else target.stem,
        "link": "",
        "authors": "",
        "additional_data": False,
        "number_forward_passes": 1,
        "dataset": dataset,
        "venue": "",
        "architecture": architecture,
        "eps": "8/255",
        "clean_acc": pct("clean"),
        "reported": "",
        "autoattack_acc": pct("aa"),
        "footnote": note,
        "engine": {
            "arch": arch_cfg.arch,
            "width": arch_cfg.width if arch_cfg.arch == "resnet18" else None,  # (WRN-34-10's is fixed)
            "num_classes": classes,
            "input_range": [0, 1],
            "recipe": cfg.recipe if cfg else None,
            "results": results,
        },  # fmt: skip
    }


def cmd_data(args) -> None:
    data_dir = args.data_dir or default_data_dir()
    if args.data_command == "download":
        from .data.download import download

        print(f"{args.dataset} ready in {download(args.dataset, data_dir, args.url, args.md5)}")
    else:
        from .data.ffcv_backend import cache_dir, write_betons_from_layout

        paths = write_betons_from_layout(args.dataset, data_dir, args.out or cache_dir())
        print("wrote " + ", ".join(str(p) for p in paths))


COMMANDS = {
    "train": cmd_train,
    "recipes": cmd_recipes,
    "eval": cmd_eval,
    "export": cmd_export,
    "table": cmd_table,
    "data": cmd_data,
}


def interrupted_line(args) -> str:
    """What an interrupted command keeps and how to go on; under torchrun, which stops the ranks of a failed rank's
    node (SIGTERM), where to look for that failure (the stopped ranks blamed an interrupt alone)."""
    line = "arat: interrupted"
    if args.command == "train" and getattr(args, "run_dir", None):
        if not (Path(args.run_dir) / "config.json").exists():  # stopped while setting up: nothing to resume yet
            line = "arat: interrupted before the run started (no config.json yet); the same command starts it again"
        else:  # a wrapper that knows better how its user goes on (scripts/demo.sh: arat is not on its user's PATH)
            how = os.environ.get("ARAT_CONTINUE_HINT") or f"`arat train --resume {shell_word(args.run_dir)}`"
            line = f"arat: interrupted; {how} continues the run from its last finished epoch"
            if (Path(args.run_dir) / "checkpoints" / "final.pt").exists():  # stopped in its closing evaluation
                line = f"arat: interrupted; {how} finishes the run's evaluation (the chunks it finished are kept)"
    elif args.command == "eval":
        line = "arat: interrupted; the same `arat eval` command again skips the chunks already finished"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        rank = os.environ.get("RANK", "?")
        line += f" (rank {rank}: if torchrun stopped this node's ranks because one failed, its error is above)"
    return line


def resource_line(args, error: BaseException) -> str | None:
    """One line for a resource that ran out or a path that failed (a full disk, no memory: also under the wrappers
    torch.compile puts around its backend's errors), saying what is kept and what to do; None: not one of those."""
    cause = innermost(error)
    if isinstance(cause, OSError):  # a path that can't be read or written (read-only, full disk, missing)
        where = f" {cause.filename}" if cause.filename else ""
        return f"cannot access{where}: {cause.strerror or cause}; check the path, its permissions and free space"
    if not isinstance(cause, (torch.OutOfMemoryError, MemoryError)):
        return None
    first = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:160]
    if args.command == "train":  # (an evaluation's own is an EvaluationOutOfMemory, a UserError)
        run = getattr(args, "run_dir", None)
        if run is not None and (Path(run) / "checkpoints" / "latest.pt").is_file():
            again = f"its last epoch's checkpoint is kept: `arat train --resume {shell_word(run)}`"
        elif run is not None and (Path(run) / "config.json").is_file():
            again = f"no epoch ended: `arat train --resume {shell_word(run)}` starts it again"
        else:
            again = "the same command again"
        if isinstance(cause, torch.OutOfMemoryError):  # the device's: the captured attack and compiled code hold some
            again += " with --set perf.cuda_graphs=off or --set perf.compile=off,"
        return f"out of memory ({first}); {again} or a new run with a smaller train.batch_size"
    return f"out of memory ({first}); free the device's memory (another process?) or take smaller batches"


STOP_SIGNALS = ("SIGTERM", "SIGHUP", "SIGUSR1")  # `timeout`, schedulers (SLURM's --signal=USR1@T), a closed terminal
_stopped_by: int | None = None  # the signal that stopped the command (its exit code is 128 + it, as the shell's)


def _terminated(signum, frame):
    """`timeout`, a scheduler or torchrun stopping the process: Ctrl-C's path and line. A second stop signal while
    the command winds down (SLURM signals every process of a step, and torchrun forwards its own) is ignored: it
    would cut the cleanup short (a group left unclosed, a traceback); SIGKILL and Ctrl-C still end it."""
    global _stopped_by
    _stopped_by = signum
    for name in STOP_SIGNALS:
        with contextlib.suppress(AttributeError, ValueError, OSError):  # (a platform without it)
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    raise KeyboardInterrupt


def stop_handlers() -> dict:
    """`_terminated` for each stop signal the process does not ignore (`nohup` ignores SIGHUP: kept so), with the
    handlers they replace, to put back after the command."""
    before = {}
    for name in STOP_SIGNALS:
        number = getattr(signal, name, None)
        if number is None or signal.getsignal(number) == signal.SIG_IGN:
            continue
        before[number] = signal.signal(number, _terminated)
    return before


def main(argv: list[str] | None = None) -> int:
    global _stopped_by
    args = build_parser().parse_args(argv)
    line_buffered(sys.stdout)
    main_thread = threading.current_thread() is threading.main_thread()
    _stopped_by, before = None, stop_handlers() if main_thread else {}
    try:
        code = run_command(args)
    except Exception:  # a traceback: a torchrun rank still leaves without finalizing (below), with exit code 1
        if not torchrun_rank_program(argv):
            raise
        traceback.print_exc()
        code = 1
    finally:
        for number, handler in before.items():  # a caller's own (pytest, the GPU check's stages) after the command
            signal.signal(number, handler)
    if torchrun_rank_program(argv):
        leave_without_finalizing(code)
    return code


def torchrun_rank_program(argv: list[str] | None) -> bool:
    """Whether this is a torchrun rank run as a program (`arat`, `python -m engine.cli`; not a caller's
    main([...])) that joined its process group."""
    if argv is not None:
        return False
    from . import distributed

    return distributed.joined_a_group()


def leave_without_finalizing(code: int) -> None:
    """A torchrun rank ends here once its command is done and its files are written: the exit handlers run
    (logging's flush, Inductor's compile workers), then the process leaves without the interpreter's finalization.
    There a thread of the process group (gloo's, with the last work of DDP's or sync BN's collectives) could still
    be dropping tensors, waiting for the GIL the finalizing interpreter holds: "terminate called without an active
    exception", SIGABRT, and torchrun called a finished run failed (rarely: 2026-12-02, the gathers, mended by
    moving them to the store; 2026-12-07, a sync-BN training run under the test suite). Other Python threads are
    not joined (the engine starts none; a thread pool's idle workers would never end: a join hung the suite run in
    one process)."""
    try:
        flush_streams()
        atexit._run_exitfuncs()  # it reports a failing handler itself and runs the others
        flush_streams()  # what the handlers printed
    finally:  # a second Ctrl-C on the way out too
        os._exit(code)


def flush_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or replaced stream: nothing to keep
            stream.flush()


def line_buffered(stream) -> None:
    """stdout sent to a file or a pipe (`nohup arat train ... > log`, SLURM, `| tee`) is block-buffered: the start
    line and the compile notice waited there through epoch 1's first pass (the compiling they announce) and a
    SIGKILL lost the lines since the last flush. Each line is written as it is printed instead."""
    with contextlib.suppress(AttributeError, ValueError, OSError):  # a stream no TextIOWrapper (a caller's own)
        stream.reconfigure(line_buffering=True)


def run_command(args) -> int:
    try:
        try:
            COMMANDS[args.command](args)
        finally:  # an error inside an epoch or an evaluation leaves its bar open: its line is cleared first
            close_bars()
    except CompiledEvaluationFailed as e:  # the trained network and the finished chunks are saved
        target = getattr(args, "run_dir", None) or getattr(args, "target", "RUN")
        again = f"`arat eval {shell_word(target)} --compile off`"
        print(f"arat: error: {e}; evaluate without compiling: {again} (the trained network is saved; the uncompiled "
              "evaluation attacks every chunk again, since compiled and eager flags may differ in the last bits)",
              file=sys.stderr)  # fmt: skip
        return 2
    except UserError as e:  # bad input: one line saying what to do, no traceback
        print(f"arat: error: {e}", file=sys.stderr)
        return 2
    except (OSError, MemoryError, RuntimeError) as e:  # RuntimeError: torch.compile's wrappers (below)
        if (line := resource_line(args, e)) is None:
            raise
        print(f"arat: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\n" + interrupted_line(args), file=sys.stderr)  # the newline ends a progress bar's line
        return 128 + (_stopped_by or signal.SIGINT)  # 130 for Ctrl-C, 143 for SIGTERM: as a shell reports them
    return 0


if __name__ == "__main__":
    sys.exit(main())
