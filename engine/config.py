"""Run configuration: one plain dataclass per component, validated on construction.

A run is a `TrainConfig` (see `engine.recipes`); `--set section.key=value` overrides a field, where `section` is a
component (`data`, `model`, ...) or `train` for the top-level fields.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

EPS_8 = 8 / 255
STEP_2 = 2 / 255


class ConfigError(UserError):
    """Bad user configuration; the message says what to do."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    _check(value in allowed, f"{name}={value!r} is not one of {', '.join(allowed)}")


def default_data_dir() -> str:
    # ARAT_DATA_DIR set but empty: unset, as the scripts read it; `~` expanded (a quoted "~/data" reaches it as is)
    return os.path.expanduser(os.environ.get("ARAT_DATA_DIR") or "./data")


PATH_KEYS = {"data.data_dir", "method.init"}  # --set values naming a path: `~` expanded (no shell does in `key=~/x`)


@dataclass
class DataConfig:
    dataset: str = "cifar10"  # cifar10 | cifar100 | synthetic
    data_dir: str = field(default_factory=default_data_dir)  # $ARAT_DATA_DIR, else ./data
    backend: str = "device"  # device | ffcv | dali
    train_subset: int = 0  # 0 = the whole training set; else the first N images (official order)
    test_subset: int = 0  # the same for the test set
    synthetic_fallback: bool = False  # use synthetic data (with a notice) when the real dataset is absent
    synthetic_size: int = 2048  # images in the synthetic training set (its test set: a quarter of it, at least 64)
    drop_last: bool = True  # training: the last partial batch is dropped (static shapes; METHOD's 390 steps)
    augment: bool = True  # training: random 32x32 crop of the 4-pixel zero-padded image, horizontal flip p=0.5

    def __post_init__(self):
        _one_of("data.dataset", self.dataset, ("cifar10", "cifar100", "synthetic"))
        _one_of("data.backend", self.backend, ("device", "ffcv", "dali"))
        _check(self.train_subset >= 0 and self.test_subset >= 0, "data.*_subset must be >= 0 (0 = all)")
        _check(self.synthetic_size > 0, "data.synthetic_size must be positive")

    @property
    def num_classes(self) -> int:
        return 100 if self.dataset == "cifar100" else 10


@dataclass
class ModelConfig:
    arch: str = "resnet18"  # resnet18 | wrn34-10
    width: int = 64  # ResNet-18 stem width (64 = the real network; 16 for CPU tests)
    split_bn: bool = True  # Split-BN: clean and adversarial images through their own BNs (false: one BN for both)

    def __post_init__(self):
        _one_of("model.arch", self.arch, ("resnet18", "wrn34-10"))
        _check(self.width > 0 and self.width % 4 == 0, "model.width must be a positive multiple of 4")


@dataclass
class AttackConfig:
    eps: float = EPS_8  # L-inf radius of the training attack (8/255)
    step_size: float = STEP_2  # PGD step (2/255)
    num_steps: int = 10  # PGD iterations of the training attack (0: the random start alone)
    start: str = "uniform"  # uniform | gaussian | none
    official_quirk: bool = False  # reproduce the official code's in-place random start (METHOD 4); off = correct

    def __post_init__(self):
        _check(0 < self.eps <= 1, "attack.eps must be in (0, 1] (images are in [0, 1]: write 8/255, not 8)")
        _check(0 < self.step_size <= 1, "attack.step_size must be in (0, 1] (images are in [0, 1]: write 2/255, not 2)")
        _check(self.num_steps >= 0, "attack.num_steps must be >= 0")
        _one_of("attack.start", self.start, ("uniform", "gaussian", "none"))


@dataclass
class MethodConfig:
    name: str = "arat"  # the training objective: arat | at | trades | mart | lbgat | arrest | std
    invariance_weight: float = 30.0  # lambda, split evenly over the tapped layers
    auto_balance: bool = True  # w_adv = clean-BN eval accuracy at epoch start, w_clean = 1 - w_adv
    balance_images: int = 1024  # images the epoch-start auto_balance measures (METHOD 4's ~1024)
    fixed_adv_weight: float = 0.5  # used when auto_balance is off
    stop_grad: bool = True  # the invariance loss's clean features are a fixed target (stop-gradient)
    predictor: bool = True  # the adversarial features pass a predictor head before the invariance loss
    # without stop_grad (the V0 / +split-BN ablations): `full` = the gradient of Dist(z', z) into both sides (METHOD
    # 5); `average` = (Dist(z', sg(z)) + Dist(sg(z'), z)) / 2, the poster's form (same value, half the gradient each)
    symmetric: str = "full"
    beta: float = 6.0  # TRADES / MART / LBGAT: weight of the KL term (LBGAT: 0 in the paper's runs)
    # TRADES / LBGAT: the BN running statistics see the train-mode forwards of the published codes (TRADES: clean,
    # adv, clean; LBGAT: adv, clean, also at beta 0) through one extra no-grad forward; false: one per half
    published_bn_updates: bool = True
    # ARREST (METHOD 6; reconstructed, unverified): invariance_weight is its lambda
    init: str = ""  # checkpoint or run directory to fine-tune; replaces the standard-training stage
    pretrain_epochs: int = 0  # standard-training epochs at the start of the run (optim.* schedule)
    finetune_lr: float = 0.025  # learning rate of the fine-tuning epochs
    finetune_milestones: tuple[int, ...] = (10, 15)  # lr *= optim.decay after these fine-tuning epochs
    replay_cos: float = 0.8660254  # noisy replay while the clean-feature cosine to the teacher is below cos(30 deg)
    replay_until: float = 0.5  # ... and within this fraction of the fine-tuning epochs

    def __post_init__(self):
        _one_of("method.name", self.name, tuple(METHOD_KEYS))  # before the data loads, on every rank
        self.finetune_milestones = _epochs("method.finetune_milestones", self.finetune_milestones)
        _check(self.invariance_weight >= 0, "method.invariance_weight must be >= 0")
        _one_of("method.symmetric", self.symmetric, ("full", "average"))
        _check(0 <= self.fixed_adv_weight <= 1, "method.fixed_adv_weight must be in [0, 1]")
        _check(self.balance_images > 0, "method.balance_images must be positive")
        _check(self.beta >= 0, "method.beta must be >= 0")
        _check(self.pretrain_epochs >= 0 and self.finetune_lr > 0, "method.pretrain_epochs >= 0, finetune_lr > 0")
        _check(-1 <= self.replay_cos <= 1, "method.replay_cos must be in [-1, 1]")
        _check(0 <= self.replay_until <= 1, "method.replay_until must be in [0, 1]")
        _check(
            not (self.init and self.pretrain_epochs),
            "method.init replaces the standard-training stage: also set method.pretrain_epochs=0 and train.epochs "
            "to the fine-tuning length (`arat train --init PATH` does all three)",
        )


def _epochs(key: str, values) -> tuple[int, ...]:
    """A milestone list as read (from --set or an older config.json): whole epochs, sorted; `check_trainable` asks
    more of a run about to train (each >= 1, none repeated)."""
    try:
        epochs = tuple(int(v) for v in values)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={values!r}: epochs, as comma-separated whole numbers (e.g. {key}=76,91)") from None
    _check(list(epochs) == sorted(epochs), f"{key}={','.join(map(str, epochs))}: in increasing order")
    return epochs


@dataclass
class OptimConfig:
    lr: float = 0.1  # SGD learning rate from epoch 2 (before the milestones)
    first_epoch_lr: float = 0.02  # METHOD 4: lr 0.02 in epoch 1
    milestones: tuple[int, ...] = (76, 91)  # lr *= decay after these epochs
    decay: float = 0.1  # the learning rate's factor at each milestone
    momentum: float = 0.9  # SGD momentum
    nesterov: bool = False  # Nesterov momentum (no recipe uses it)
    weight_decay: float = 5e-4  # L2 weight decay on every trained parameter (BN's and the predictors' too)

    def __post_init__(self):
        self.milestones = _epochs("optim.milestones", self.milestones)
        _check(self.lr > 0 and self.first_epoch_lr > 0, "optim.lr and optim.first_epoch_lr must be positive")
        _check(all(m >= 1 for m in self.milestones), "optim.milestones are epochs: each must be >= 1")
        _check(0 < self.decay <= 1, "optim.decay multiplies the learning rate at each milestone: 0 < decay <= 1")
        _check(self.weight_decay >= 0 and 0 <= self.momentum < 1, "optim.weight_decay >= 0, 0 <= momentum < 1")
        _check(not self.nesterov or self.momentum > 0, "optim.nesterov needs optim.momentum > 0")

    def lr_at(self, epoch: int) -> float:
        """Learning rate of 1-based `epoch` (piecewise constant)."""
        if epoch == 1:
            return self.first_epoch_lr
        return self.lr * self.decay ** sum(epoch > m for m in self.milestones)


@dataclass
class SWAConfig:
    enabled: bool = False  # keep an average of the weights; its adv BN statistics re-estimated at the end
    start_epoch: int = 76  # averaging runs from this (1-based) epoch on
    every: int = 500  # iterations between averaging updates

    def __post_init__(self):
        _check(self.start_epoch >= 0 and self.every > 0, "swa.start_epoch >= 0 and swa.every > 0")


EVAL_ATTACKS = ("clean", "pgd20", "aa")  # and the order they run in


@dataclass
class EvalConfig:
    attacks: tuple[str, ...] = ("clean", "pgd20", "aa")  # any of these, run in this order
    num_examples: int = 10000  # first N test images (official order) for clean and PGD-20
    aa_num_examples: int = 0  # first N for AutoAttack (0 = num_examples): AA costs ~10^4 forwards per robust image
    batch_size: int = 1000  # at most this many images per forward (the batch is the chunk when smaller)
    aa_version: str = "standard"  # standard (the leaderboard protocol) | legacy-10 (torchattacks' 10-iteration one)
    chunk_size: int = 0  # images per chunk (own seed, saved when done, one rank); 0 = sized for the device

    def __post_init__(self):
        if isinstance(self.attacks, str):
            self.attacks = tuple(a for a in self.attacks.split(",") if a)
        for name in self.attacks:
            _one_of("eval.attacks entry", name, EVAL_ATTACKS)
        # one order whatever the user wrote: a compiled attacker's first shape decides which graph the others reuse
        # (AutoAttack's dynamic-batch one would serve PGD-20 after it), and with it the last bits of PGD-20's flags
        self.attacks = tuple(a for a in EVAL_ATTACKS if a in self.attacks)
        _check(bool(self.attacks), "eval.attacks is empty: name at least one of clean, pgd20, aa")
        _check(self.num_examples > 0 and self.batch_size > 0, "eval.num_examples and eval.batch_size must be > 0")
        _check(self.aa_num_examples >= 0, "eval.aa_num_examples must be >= 0 (0 = eval.num_examples)")
        _one_of("eval.aa_version", self.aa_version, ("standard", "legacy-10"))
        _check(0 <= self.chunk_size <= 10000, "eval.chunk_size must be in 0..10000 (0 = sized for the device)")


@dataclass
class PerfConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # autocast: auto (bf16 where native, else fp16 on CUDA / fp32 on CPU) | bf16 | fp16 | fp32
    channels_last: bool = True  # NHWC memory layout of images and convolution weights
    compile: str = "auto"  # auto (on for CUDA) | on | off: torch.compile, one static-shape graph set per role
    compile_backend: str = "inductor"  # torch.compile backend (tests use eager / aot_eager: no codegen)
    compile_mode: str = "default"  # default | max-autotune-no-cudagraphs | max-autotune | reduce-overhead
    dual_forward: bool = True  # clean + adv forwards as one pass over the concatenated batch (per-half BN stats)
    kernels: str = "auto"  # auto (on for CUDA) | on | off: fused PGD step and dual BN (native library on a CPU)
    cudnn_benchmark: str = "auto"  # auto (on for CUDA: static shapes) | on | off
    cuda_graphs: str = "auto"  # auto (on for CUDA) | on | off: each PGD attack captured once as a CUDA graph
    gemm_conv: int = 0  # CPU: convolutions with outputs of at most N x N pixels run as one matrix product (0: off)
    # repeatable kernels (cuDNN's deterministic ones, nothing timed to choose, torch's deterministic algorithms): on
    # CUDA a resumed run then equals an uninterrupted one, as it does on a CPU anyway; slower
    deterministic: bool = False

    def __post_init__(self):
        _one_of("perf.dtype", self.dtype, ("auto", "bf16", "fp16", "fp32"))
        _one_of("perf.kernels", self.kernels, ("auto", "on", "off"))
        as_switch = {"true": "on", "false": "off", "1": "on", "0": "off"}  # --set perf.compile=true still works
        self.compile = as_switch.get(str(self.compile).lower(), self.compile)
        _one_of("perf.compile", self.compile, ("auto", "on", "off"))
        _one_of("perf.compile_backend", self.compile_backend, ("inductor", "aot_eager", "eager"))
        modes = ("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead")
        _one_of("perf.compile_mode", self.compile_mode, modes)
        _one_of("perf.cudnn_benchmark", self.cudnn_benchmark, ("auto", "on", "off"))
        _check(not (self.deterministic and self.cudnn_benchmark == "on"),
               "perf.deterministic times no cuDNN algorithms: leave perf.cudnn_benchmark auto or off")  # fmt: skip
        _one_of("perf.cuda_graphs", self.cuda_graphs, ("auto", "on", "off"))
        _check(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), "perf.device: auto|cpu|cuda")
        _check(
            isinstance(self.gemm_conv, int) and not isinstance(self.gemm_conv, bool) and self.gemm_conv >= 0,
            "perf.gemm_conv: an output size in pixels >= 0",
        )


@dataclass
class DistConfig:
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    # how long a rank waits in a collective before the job fails: an evaluation's ranks wait for the slowest one's
    # AutoAttack chunk (NCCL's own default, 10 minutes, can end a healthy WRN-34-10 evaluation)
    timeout_min: float = 180.0
    # BN batch statistics over every rank's images (METHOD's batch of 128 at 8 x 16); off: each rank's own. It
    # synchronizes only under torchrun with more than one rank (one process: plain BN, nothing refused). There it
    # runs uncompiled and uncaptured (perf.compile / perf.cuda_graphs auto resolve off, on is refused), without the
    # fused dual BN, and is refused with fp16 (each rank's attack scales its loss by its own power of two)
    sync_bn: bool = False

    def __post_init__(self):
        _one_of("dist.backend", self.backend, ("auto", "nccl", "gloo"))
        _check(self.timeout_min > 0, "dist.timeout_min: minutes > 0")


@dataclass
class AnalysisConfig:
    grad_sim: bool = False  # per step: cosine of the classification and invariance gradients (2 more backwards)


@dataclass
class TrainConfig:
    recipe: str = "custom"  # the recipe's name, as recorded (set by --recipe)
    description: str = ""  # the recipe's one line, as recorded
    seed: int = 0  # weights, data order, augmentation, attack noise (per rank), synthetic data, evaluation's attacks
    epochs: int = 100  # training epochs (each a pass over the training set)
    batch_size: int = 128  # per process (under torchrun one optimizer step averages batch_size x ranks images)
    log_every: int = 50  # steps between progress-bar updates (reads device metrics: a host sync)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    swa: SWAConfig = field(default_factory=SWAConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)

    def __post_init__(self):
        _check(self.epochs > 0, "train.epochs must be positive")
        _check(self.batch_size > 1, "train.batch_size must be > 1 (batch statistics)")
        _check(self.log_every > 0, "train.log_every must be positive")
        # the loader seeds each epoch with seed * 1_000_003 + epoch, which torch's RNG takes below 2^63
        _check(0 <= self.seed < 2**32, "train.seed must be in [0, 2^32)")
        _check_finite(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")


METHOD_KEYS = {  # method.* keys each method reads (besides name)
    "arat": {
        "invariance_weight",
        "auto_balance",
        "balance_images",
        "fixed_adv_weight",
        "stop_grad",
        "predictor",
        "symmetric",
    },  # fmt: skip
    "trades": {"beta", "published_bn_updates"},
    "mart": {"beta"},
    "lbgat": {"beta", "published_bn_updates"},
    "arrest": {
        "invariance_weight",
        "init",
        "pretrain_epochs",
        "finetune_lr",
        "finetune_milestones",
        "replay_cos",
        "replay_until",
    },  # fmt: skip
    "at": set(),
    "std": set(),
}


def ignored_method_keys(method: MethodConfig) -> list[str]:
    """The method.* keys set away from their defaults that this method never reads (AR-AT's fixed weight under its
    auto-balance, its symmetric form under stop-grad too): a run would train as if they were not set."""
    if method.name not in METHOD_KEYS:  # refused as an unknown method when the run is built
        return []
    default, reads = MethodConfig(), method_reads(method)
    unread = [f.name for f in dataclasses.fields(MethodConfig) if f.name not in reads
              and getattr(method, f.name) != getattr(default, f.name)]  # fmt: skip
    plain = [k for k in unread if k not in METHOD_KEYS[method.name]]
    switch = {"fixed_adv_weight": "auto_balance", "symmetric": "stop_grad"}  # method_reads' conditions
    return plain + [f"{k} (read with method.{switch[k]}=false)" for k in unread if k in METHOD_KEYS[method.name]]


def check_trainable(cfg: TrainConfig) -> None:
    """What a run must not train with, beyond each section's own checks: switches one method would ignore or misuse.
    Checked when a run is built (not when a config is read: an older run's evaluation or export still loads)."""
    swa, method = cfg.swa, cfg.method
    # SWA re-estimates the averaged network's BN statistics on PGD examples (METHOD 4)
    _check(not swa.enabled or method.name != "std", "swa.enabled: SWA's BN statistics are re-estimated on PGD "
           "examples, which standard training never sees; set swa.enabled=false")  # fmt: skip
    # (no standard stage with --init, pretrain_epochs=0: start_epoch 0 is epoch 1, as anywhere else)
    mixes_stages = method.name == "arrest" and method.pretrain_epochs > 0 and swa.start_epoch <= method.pretrain_epochs
    _check(not swa.enabled or not mixes_stages,
           f"swa.enabled: ARREST's standard stage runs to epoch {method.pretrain_epochs}: averaging from "
           f"swa.start_epoch={swa.start_epoch} mixes its weights with fine-tuned ones; start later")  # fmt: skip
    _check(not method.init or method.name == "arrest", f"method.init fine-tunes an ARREST run; {method.name} "
           "starts from fresh weights: drop method.init")  # fmt: skip
    # without either, ARREST's teacher would be the untrained network (its cosine 1: the replay never fires)
    _check(method.name != "arrest" or bool(method.init) or method.pretrain_epochs > 0,
           "ARREST fine-tunes a standard-trained network: give it one (`arat train --init PATH`) or train one "
           "first (method.pretrain_epochs > 0, within train.epochs)")  # fmt: skip
    # read back from an older config.json these load (its evaluation and export), but train no more:
    _check(cfg.model.arch == "resnet18" or cfg.model.width == 64, f"model.width={cfg.model.width} sizes ResNet-18 "
           "only; WRN-34-10's widths are its own (16 x 10, ...): drop model.width")  # fmt: skip
    _check(bool(cfg.data.data_dir.strip()), "data.data_dir is empty: name the data folder (or leave it at its default)")
    for key, milestones in (("optim.milestones", cfg.optim.milestones),
                            ("method.finetune_milestones", method.finetune_milestones)):  # fmt: skip
        _check(all(m >= 1 for m in milestones) and len(set(milestones)) == len(milestones),
               f"{key}={','.join(map(str, milestones))}: epochs counted from 1, each once (a repeated one decays "
               "the rate twice at once)")  # fmt: skip
    # only a PGD step projects onto [0, 1]: TRADES's gaussian start alone leaves pixels outside it
    _check(cfg.attack.num_steps > 0 or cfg.attack.start != "gaussian" or method.name == "std",
           "attack.num_steps=0 with attack.start=gaussian trains on x + noise outside [0, 1]: take at least one "
           "step, or attack.start=uniform/none")  # fmt: skip


def ignored_keys_notice(method: MethodConfig) -> str | None:
    """Said at start, not refused (`scripts/reproduce.sh` passes one --set to every method's run): the method.* keys
    set that this run's method does not read."""
    ignored = ignored_method_keys(method)
    if not ignored:
        return None
    return f"{method.name} does not read method.{', method.'.join(ignored)}: the run trains as if unset"


def _check_finite(cfg: TrainConfig) -> None:
    """Every float of the config is finite (inf, nan and 8/0 train garbage or NaN without an error)."""
    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        items = dataclasses.asdict(value).items() if dataclasses.is_dataclass(value) else [(None, value)]
        for name, v in items:
            key = f"{section.name}.{name}" if name else f"train.{section.name}"
            _check(not isinstance(v, float) or math.isfinite(v), f"{key}={v} is not a finite number")


SECTIONS = {f.name for f in dataclasses.fields(TrainConfig) if dataclasses.is_dataclass(f.default_factory)}  # type: ignore[arg-type]
# Keys added after runs were made whose default is not what the engines before them did: a config written without
# the key (by an older engine) reads as what its run trained with, not as today's default
ADDED_LATER = {("method", "published_bn_updates"): False}  # ec95a82, 2026-12-02: one BN update per half before


def as_trained(raw: dict) -> dict:
    """A config as JSON holds it, with the keys of ADDED_LATER its sections lack filled with what the engines before
    them did (config.json of an older engine's run: what it trained with)."""
    for (section, key), before in ADDED_LATER.items():
        if isinstance(raw.get(section), dict) and key not in raw[section]:
            raw = raw | {section: raw[section] | {key: before}}
    return raw


def from_dict(raw: Any, source: str = "config") -> TrainConfig:
    """Inverse of `TrainConfig.to_dict` (a run's `config.json`, a checkpoint's config). Plain data only: unknown
    keys and values of the wrong type are a `ConfigError` naming `source` and the key, never a TypeError."""
    _check(isinstance(raw, dict), f"{source}: the config is a {type(raw).__name__}, not a JSON object")
    known = {f.name: f for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(str(k) for k in raw if k not in known)
    _check(not unknown, f"{source}: unknown config keys {unknown[:3]}; it was written by another engine version")
    raw = as_trained(raw)
    kwargs: dict[str, Any] = {}
    for name, value in raw.items():
        default = known[name].default_factory() if name in SECTIONS else known[name].default  # type: ignore[misc]
        if name not in SECTIONS:
            kwargs[name] = _typed(value, default, f"train.{name}", source)
            continue
        _check(isinstance(value, dict), f"{source}: {name} is a {type(value).__name__}, not a section")
        fields = {f.name: getattr(default, f.name) for f in dataclasses.fields(default)}
        unknown = sorted(str(k) for k in value if k not in fields)
        _check(not unknown, f"{source}: unknown keys {unknown[:3]} in {name}; it was written by another engine version")
        typed = {k: _typed(v, fields[k], f"{name}.{k}", source) for k, v in value.items()}  # (said with the file)
        try:  # the section's own checks (a value an older engine took, or an edit): said with the file too
            kwargs[name] = type(default)(**typed)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}" if source else str(e)) from None
    return TrainConfig(**kwargs)


# What a resume may find changed in config.json: how and where the run goes on (`--set` on a resume takes the same
# perf.*, dist.*, eval.* keys), how far (train.epochs), what it says; everything else is what the run trains
RESUME_FREE = {"train.epochs", "train.log_every", "train.description", "data.data_dir", "data.backend",
               "data.test_subset", "data.synthetic_fallback", "swa.enabled"}  # fmt: skip
RESUME_FREE_SECTIONS = {"eval", "perf", "dist", "analysis"}  # but dist.sync_bn (each rank's statistics)
# the schedule's keys: free where the trained epochs' rates (and ARREST's replay window) stay as they were
SCHEDULE = {"optim.lr", "optim.first_epoch_lr", "optim.milestones", "optim.decay", "method.finetune_lr",
            "method.finetune_milestones", "method.replay_until"}  # fmt: skip


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """The learning rate of 1-based `epoch`: optim's schedule; ARREST's fine-tuning stage its own."""
    m = cfg.method
    if m.name != "arrest" or epoch <= m.pretrain_epochs:
        return cfg.optim.lr_at(epoch)
    return m.finetune_lr * cfg.optim.decay ** sum(epoch - m.pretrain_epochs > e for e in m.finetune_milestones)


def in_replay_window(cfg: TrainConfig, epoch: int) -> bool:
    """ARREST: whether 1-based `epoch` lies in the part of fine-tuning where noisy replay may fire."""
    e, m = epoch - cfg.method.pretrain_epochs, cfg.method
    return cfg.method.name == "arrest" and 1 <= e <= m.replay_until * (cfg.epochs - m.pretrain_epochs)


def method_reads(method: MethodConfig) -> set[str]:
    """The method.* keys `method` reads, its name included (AR-AT's fixed weight only without its auto-balance,
    its symmetric form only without stop-grad)."""
    reads = set(METHOD_KEYS.get(method.name, set())) | {"name"}
    if method.name == "arat" and method.auto_balance:
        reads.discard("fixed_adv_weight")
    if method.name == "arat" and method.stop_grad:
        reads.discard("symmetric")
    return reads


def flatten(raw: dict) -> dict[str, Any]:
    """A config as JSON holds it (`to_dict`, config.json), as {"section.key": value} with the keys `--set` names
    (train.* for the top level)."""
    out = {}
    for name, value in raw.items():
        out |= {f"{name}.{k}": v for k, v in value.items()} if isinstance(value, dict) else {f"train.{name}": value}
    return out


def flat(cfg: TrainConfig) -> dict[str, Any]:
    """`flatten` of `cfg`, its values as JSON holds them (lists)."""
    return flatten(json.loads(json.dumps(cfg.to_dict())))


def resume_change(
    trained: TrainConfig, now: TrainConfig, epochs_done: int, saved: set[str] | None = None
) -> str | None:
    """What config.json (`now`) changed against the config the checkpoint's epochs trained with (`trained`) that a
    resume cannot take, said in one line; None when it may go on. Changed mid-run, the result would mix two runs
    under the second's name (an eps, a weight, a seed, a batch size). Free: how and where it runs, how far, the
    schedule where no trained epoch's rate (or ARREST replay window) moves (a decay added past the trained
    epochs), method keys the method reads under neither config, SWA's start and cadence while neither has averaged.
    `saved`: the keys the checkpoint's config held (an older engine's lacks newer ones: not compared)."""
    if now.epochs < epochs_done:
        return (f"config.json's epochs ({now.epochs}) is below the {epochs_done} epochs the run trained: raise it, "
                "or evaluate the run as it is (`arat eval RUN`)")  # fmt: skip
    old, new = flat(trained), flat(now)
    reads = method_reads(trained.method) | method_reads(now.method)
    swa_started = min(trained.swa.start_epoch, now.swa.start_epoch) <= epochs_done
    swa_fixed = trained.swa.enabled and now.swa.enabled and swa_started  # (averaging under either)
    for key, value in new.items():
        section, _, name = key.partition(".")
        if key in RESUME_FREE or key in SCHEDULE or saved is not None and key not in saved:
            continue
        if section in RESUME_FREE_SECTIONS and key != "dist.sync_bn":
            continue
        if section == "method" and name not in reads or section == "swa" and not swa_fixed:
            continue
        was = bool(old[key]) if key == "method.init" else old[key]  # (the file it names may have moved since)
        if (bool(value) if key == "method.init" else value) != was:
            named = key.removeprefix("train.")  # (config.json holds train.* at its top level)
            return (f"config.json's {named} ({_said(value)}) is not the checkpoint's ({_said(old[key])}): a run cannot "
                    "change what it trains part-way; restore it, or start a new run with it")  # fmt: skip
    for e in range(1, epochs_done + 1):  # the schedule's keys, by what they did
        if not math.isclose(lr_at(trained, e), lr_at(now, e), rel_tol=1e-9):  # (0.1 * 0.1 * 0.1 is not 0.1 * 0.01)
            return (f"config.json's learning-rate schedule changes epoch {e}'s rate ({lr_at(trained, e):g} -> "
                    f"{lr_at(now, e):g}), which the run trained already: change it only past the trained epochs, "
                    "or start a new run")  # fmt: skip
        if in_replay_window(trained, e) != in_replay_window(now, e):
            return (f"config.json moves ARREST's noisy-replay window over epoch {e}, which the run trained already "
                    "(method.replay_until x the fine-tuning epochs): restore its epochs and "
                    "method.replay_until, or start a new run")  # fmt: skip
    return None


def _said(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    return str(value).lower() if isinstance(value, bool) else repr(value) if value == "" else str(value)


BOOL_TO_SWITCH = {"perf.compile"}  # once true/false, now auto|on|off


def _typed(value: Any, default: Any, key: str, source: str) -> Any:
    """`value` as the type of the field's default (JSON lists become tuples; ints are floats where floats are)."""
    kind = type(default)
    ok = (
        isinstance(value, bool)
        if kind is bool
        else isinstance(value, int) and not isinstance(value, bool)
        if kind is int
        else isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind is float
        else isinstance(value, (list, tuple)) and all(isinstance(v, (int, str)) for v in value)
        if kind is tuple
        else isinstance(value, kind)
    )
    if kind is str and isinstance(value, bool) and key in BOOL_TO_SWITCH:  # written when the field was a bool
        return "on" if value else "off"
    _check(ok, f"{source}: {key}={value!r} is not a {kind.__name__}")
    return tuple(value) if kind is tuple else float(value) if kind is float else value


def _parse_value(text: str, current: Any, key: str) -> Any:
    try:
        if isinstance(current, bool):
            lowered = text.lower()
            _check(lowered in ("true", "false", "1", "0", "yes", "no", "on", "off"), f"{key} needs true or false")
            return lowered in ("true", "1", "yes", "on")
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(eval_fraction(text))
        if isinstance(current, tuple):  # 76,91 (also [76, 91] or (76, 91), as a list is often written)
            inner = text.strip()
            if inner[:1] + inner[-1:] in ("[]", "()"):
                inner = inner[1:-1]
            items = [s.strip() for s in inner.split(",") if s.strip()]
            return tuple(type(current[0])(s) for s in items) if current else tuple(items)
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        if isinstance(current, tuple) and current:
            example = ",".join(str(v) for v in current)
            raise ConfigError(
                f"--set {key}={text}: expected comma-separated {type(current[0]).__name__}s, e.g. {key}={example}"
            ) from None
        kind = type(current).__name__
        raise ConfigError(f"--set {key}={text}: expected {'an' if kind[0] in 'aeiou' else 'a'} {kind}") from None
    return text


def eval_fraction(text: str) -> float:
    """'8/255' -> 0.0313...; plain numbers pass through."""
    if "/" in text:
        num, den = text.split("/", 1)
        if float(den) == 0:
            raise ValueError(f"{text}: division by zero")
        return float(num) / float(den)
    return float(text)


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Return a new config with `section.key=value` overrides applied and everything re-validated."""
    raw = cfg.to_dict()
    for item in overrides:
        key, sep, text = item.partition("=")
        section, dot, name = key.strip().partition(".")
        _check(bool(sep and dot and name), f"--set {item!r}: expected section.key=value (e.g. train.epochs=5)")
        target = raw if section == "train" else raw.get(section) if section in SECTIONS else None
        _check(target is not None, f"--set {key}: unknown section {section!r} (train, {', '.join(sorted(SECTIONS))})")
        _check(name in target and not isinstance(target[name], dict), f"--set {key}: unknown key {name!r}")
        target[name] = _parse_value(text.strip(), target[name], key)
        if f"{section}.{name}" in PATH_KEYS:
            target[name] = os.path.expanduser(target[name])
    keys = {item.partition("=")[0].strip() for item in overrides}
    # a recipe without a warm first epoch (first_epoch_lr = lr: the baselines) keeps none when lr is set: epoch 1
    # ran at the recipe's rate, then the new one
    if "optim.lr" in keys and "optim.first_epoch_lr" not in keys and cfg.optim.first_epoch_lr == cfg.optim.lr:
        raw["optim"]["first_epoch_lr"] = raw["optim"]["lr"]
    return from_dict(raw, source="")  # (a bad value is said as --set gave it, without a file's name)


def schedule_notice(cfg: TrainConfig) -> str | None:
    """A learning-rate milestone the run never reaches (e.g. a 100-epoch recipe cut to 30 epochs): said, not
    refused (a short run may mean it)."""
    if cfg.method.name == "arrest":
        key, milestones = "method.finetune_milestones", cfg.method.finetune_milestones
        last = cfg.epochs - cfg.method.pretrain_epochs  # fine-tuning epochs
    else:
        key, milestones, last = "optim.milestones", cfg.optim.milestones, cfg.epochs
    late = [m for m in milestones if m >= last]
    if not late:
        return None
    return (f"{key}={','.join(map(str, milestones))}: the learning rate never decays after epoch"
            f"{'s' if len(late) > 1 else ''} {', '.join(map(str, late))} in a run of {last} epochs "
            f"(set {key} to change that)")  # fmt: skip
