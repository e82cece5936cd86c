"""The training loop: method-agnostic, resumable, no host sync inside the step."""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from . import distributed, perf
from .analysis import GradSim, build_grad_sim
from .config import (
    ConfigError,
    PerfConfig,
    TrainConfig,
    check_trainable,
    flatten,
    from_dict,
    ignored_keys_notice,
    resume_change,
    schedule_notice,
)
from .data import ArraySplit, DataError, Loader, build_loaders, data_notice, data_source, load_splits, resolve_dataset
from .errors import UserError, shell_word
from .evaluate import evaluate, format_results, summary, write_flags
from .methods import Method, Nets, build_method, check_method
from .models import CheckpointError, build_model, read_checkpoint, set_sync_bn
from .progress import progress_bar
from .rundir import FINAL, LATEST, RunDir, RunDirError, environment, version_line
from .swa import SWA


class Diverged(UserError):
    """A non-finite training loss: the run stops before writing anything of the diverged epoch."""


@dataclass
class Run:
    """Everything a training run holds; a checkpoint saves and restores exactly the mutable part."""

    cfg: TrainConfig
    dist: distributed.DistInfo
    perf: perf.Perf
    nets: Nets
    method: Method
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    swa: SWA
    train_loader: Loader
    test_split: ArraySplit
    grad_sim: GradSim | None = None  # per-step gradient-similarity analysis (analysis.grad_sim)
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    warm: bool = False  # compiled, this process has built its graphs (taken a step); not saved
    step_flops: float | None = None  # METHOD 9's FLOPs per AR-AT image-step, counted at the first epoch's end
    requested_device: str = "auto"  # perf.device as configured (cfg holds the resolved one): what config.json keeps
    train_data: str | None = None  # the training split's fingerprint (env.json: a resume must train on the same)
    dataset: str = ""  # what it trains on (resolve_dataset's when the splits were read: synthetic for a fallback)

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "model": self.nets.raw.state_dict(),
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "swa": self.swa.state_dict(),
            "rng": distributed.gather_objects(self.rng_state(), self.dist),  # one entry per rank
            # under DDP each rank's BN statistics are its own (not synced): a resume restores each rank's
            "rank_buffers": distributed.gather_objects(self.buffers(), self.dist) if self.dist.enabled else None,
            "config": self.cfg.to_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step = state["epoch"], state["step"]
        if state.get("config"):  # config.json edited since: what the run trains stays (dist.sync_bn too: turned
            # on, each rank's own running means would be the shifts of one sum, which must be equal)
            try:
                trained = from_dict(state["config"], "the checkpoint's config")
            except ConfigError:  # an older engine's config that today's checks refuse: nothing to compare with
                trained = None
            change = trained and resume_change(trained, self.cfg, state["epoch"], set(flatten(state["config"])))
            if change:
                raise RunDirError(change)
        parts = [(self.nets.raw, "model"), (self.method, "method"), (self.optimizer, "optimizer"), (self.swa, "swa")]
        if state["scaler"]:  # empty from a run without fp16 (bf16/fp32, scaler off): resumed where fp16 is chosen,
            parts.append((self.scaler, "scaler"))  # the scaler starts afresh (loading {} would raise)
        for part, key in parts:
            try:
                part.load_state_dict(state[key])
            except UserError:  # its own one-line message
                raise
            except (RuntimeError, ValueError, KeyError) as e:  # config.json edited (another width, no predictor...)
                raise RunDirError(
                    f"the checkpoint's {key} does not fit the run's config.json ({brief_load_error(e)}); "
                    "restore the config the run was started with"
                ) from None
        seed_momentum(self.optimizer)  # a checkpoint without a buffer for some parameter: fused SGD takes none
        restore_optimizer_kind(self.optimizer, self.perf.device)
        if len(state["rng"]) != self.dist.world_size:
            raise RunDirError(f"the checkpoint was written by {len(state['rng'])} processes; resume with as many")
        if self.dist.enabled and state.get("rank_buffers"):  # absent from a checkpoint of an older engine
            own = dict(self.named_buffers())
            for name, value in state["rank_buffers"][self.dist.rank].items():
                own[name].copy_(value)
        rng_cpu, rng_cuda = state["rng"][self.dist.rank]
        torch.set_rng_state(rng_cpu.cpu())  # both setters take CPU byte tensors only, whatever the device
        if rng_cuda is not None:
            torch.cuda.set_rng_state(rng_cuda.cpu(), self.perf.device)

    def named_buffers(self):
        """The buffers (BN statistics) of the network and the method."""
        return itertools.chain(self.nets.raw.named_buffers(prefix="model"), self.method.named_buffers(prefix="method"))

    def buffers(self) -> dict[str, torch.Tensor]:
        """This rank's buffers, on the CPU."""
        return {name: b.detach().cpu().clone() for name, b in self.named_buffers()}

    def rng_state(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        cuda = self.perf.device.type == "cuda"
        return torch.get_rng_state(), torch.cuda.get_rng_state(self.perf.device) if cuda else None


def brief_load_error(error: Exception) -> str:
    """The last line of a failed `load_state_dict`, its key list cut to the first three (a method's predictors alone
    name 32 keys: the one-line message ran to 2,000 characters)."""
    lines = str(error).strip().splitlines()
    last = lines[-1].strip() if lines else type(error).__name__
    head, sep, keys = last.partition(": ")
    names = [k.strip().strip('"') for k in keys.rstrip(". ").split(", ")] if sep and keys.startswith('"') else []
    if len(names) <= 3:
        return last
    return f"{head}: {', '.join(names[:3])} and {len(names) - 3} more"


def build_optimizer(params, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    o = cfg.optim
    optimizer = torch.optim.SGD(
        params,
        lr=o.lr_at(1),
        momentum=o.momentum,
        weight_decay=o.weight_decay,
        nesterov=o.nesterov,
        fused=device.type == "cuda",  # one kernel for every parameter (restore_optimizer_kind after a checkpoint)
        foreach=device.type != "cuda",  # a handful of ops per step instead of ~5 per parameter (torch's CPU default)
    )
    seed_momentum(optimizer)
    return optimizer


def seed_momentum(optimizer: torch.optim.Optimizer) -> None:
    """Zero momentum buffers where there are none yet: the first step then computes exactly what SGD's own first
    step does (buffer = gradient), and a first step the fp16 scaler skips (its gradients inf, as the scale starts
    at 2^16) cannot leave fused SGD's buffers as it made them, uninitialized (torch.empty_like, the kernel returning
    before writing them): the next real step read that memory as momentum (weights ~1e36, then a NaN loss)."""
    for group in optimizer.param_groups:
        if group["momentum"]:
            for p in group["params"]:
                optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p))


def restore_optimizer_kind(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """The fused/foreach choice of this device, after a checkpoint's param groups replaced it: a CPU checkpoint
    resumed on CUDA (`--set perf.device=cuda`) brought foreach SGD back, which under fp16's GradScaler (its fused
    path hands the optimizer grad_scale and found_inf) fails its first step; on bf16 it silently lost the fused
    kernel. And each momentum buffer in its parameter's memory format: a run resumed with another
    perf.channels_last kept the checkpoint's strides, which CUDA's fused SGD refuses (parameters, gradients and
    buffers must share them)."""
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = device.type == "cuda", device.type != "cuda"
    for param, state in optimizer.state.items():
        buffer = state.get("momentum_buffer")
        if buffer is not None and buffer.stride() != param.stride():
            state["momentum_buffer"] = torch.empty_like(param).copy_(buffer)


def sync_bn_perf(perf_cfg: PerfConfig) -> PerfConfig:
    """The perf settings under dist.sync_bn, where it synchronizes (more than one process): uncompiled and
    uncaptured (its all-reduce inside every BN is neither compiled nor captured yet); auto resolves to off, on is
    refused."""
    if "on" in (perf_cfg.compile, perf_cfg.cuda_graphs):
        raise ConfigError(
            "dist.sync_bn runs uncompiled and uncaptured (its all-reduce inside every BN is neither "
            "compiled nor captured yet): leave perf.compile and perf.cuda_graphs at auto or off"
        )
    return replace(perf_cfg, compile="off", cuda_graphs="off")


def synchronize_bn(model: nn.Module, method: Method, switches: perf.Perf) -> None:
    """Every BN of the network and the method's own (AR-AT's predictors, LBGAT's clean model) synchronized."""
    if switches.dtype == torch.float16:  # each rank's attack scales its loss by its own power of two
        raise ConfigError(
            "dist.sync_bn with fp16 (perf.dtype auto picks it where the GPU has no bf16): the "
            "ranks' summed input gradients would mix their loss scales; set perf.dtype=fp32"
        )
    set_sync_bn(model, True)
    set_sync_bn(method, True)
    if switches.kernels != "off":  # the fused dual BN computes each rank's own statistics: set_sync_bn took it off
        switches.kernels += " (no dual BN: dist.sync_bn)"


def build_run(cfg: TrainConfig, from_checkpoint: bool = False) -> Run:
    """Set up the process group, data, network, method and optimizer, with every perf switch applied.
    `from_checkpoint`: a checkpoint will replace the starting weights, so ARREST's method.init is not read (the
    file may have moved since the run started; the checkpoint holds the network and the teacher)."""
    check_trainable(cfg)  # before a resume's init="" below
    cfg = replace(cfg, perf=replace(cfg.perf))  # (its device is resolved below: the caller's config keeps `auto`)
    requested_device = cfg.perf.device
    device = perf.resolve_device(cfg.perf.device)
    info = distributed.init(cfg.dist, device.type)
    try:
        return build_in_group(cfg, from_checkpoint, info, device, requested_device)
    except BaseException:
        # this rank leaves its group at once, marking the exchange it will not reach. Not waiting for the others to
        # leave the store: a refusal every rank raises after the same gather leaves none waiting, and under torchrun
        # the first rank to exit has the others killed before they print
        distributed.shutdown(info, wait=False)
        raise


def build_in_group(
    cfg: TrainConfig, from_checkpoint: bool, info: distributed.DistInfo, device: torch.device, requested_device: str
) -> Run:
    """build_run's part once this process is in its group (torchrun): the data, network, method and optimizer."""
    cfg.perf.device = str(distributed.local_device(info, device))
    perf.make_current(torch.device(cfg.perf.device))
    torch.manual_seed(cfg.seed)
    train_split, test_split, train_data, dataset = same_data_on_every_rank(cfg, info)
    model = build_model(cfg.model, cfg.data.num_classes)
    method = build_method(replace(cfg, method=replace(cfg.method, init="")) if from_checkpoint else cfg, model)
    sync_bn = cfg.dist.sync_bn and info.enabled  # (one process: nothing to synchronize)
    perf_cfg = sync_bn_perf(cfg.perf) if sync_bn else cfg.perf
    train_net, attack_net, switches = perf.apply(model, perf_cfg)
    same_precision_on_every_rank(switches, info)
    method.to(switches.device)
    method.follow(lambda net: perf.follow(net, perf_cfg, switches.device))
    if sync_bn:
        synchronize_bn(model, method, switches)
    nets = Nets(train=distributed.wrap(train_net, info, switches.device), attack=attack_net, raw=model)
    torch.manual_seed(distributed.rank_seed(cfg.seed, info.rank))  # same initial weights, distinct noise per rank
    train_loader, _ = build_loaders(
        cfg.data,
        train_split,
        None,  # no test loader: the evaluation reads test_split itself (a DALI one was a second GPU pipeline per rank)
        cfg.batch_size,
        cfg.eval.batch_size,
        switches.device,
        cfg.seed,
        cfg.perf.channels_last,
        info.rank,
        info.world_size,
    )
    if len(train_loader) == 0:
        raise ConfigError(
            f"{train_loader.num_images} training images make no batch of {cfg.batch_size}: "
            "lower train.batch_size or use more data"
        )
    last = train_loader.num_images % cfg.batch_size
    if len(train_loader) * cfg.batch_size > train_loader.num_images and last == 1:  # data.drop_last=false
        raise ConfigError(
            f"data.drop_last=false leaves a last batch of 1 image of {train_loader.num_images} (batch statistics "
            "need 2): keep data.drop_last=true or change train.batch_size"
        )
    swa = SWA(model, cfg.swa)
    if cfg.swa.enabled and not swa.updates(len(train_loader), cfg.epochs):
        raise ConfigError(
            f"SWA would average nothing: epochs {cfg.swa.start_epoch}-{cfg.epochs} hold no step that is a multiple of "
            f"swa.every={cfg.swa.every} ({len(train_loader)} steps per epoch); lower swa.start_epoch or swa.every, or "
            "set swa.enabled=false"
        )
    params = [p for p in itertools.chain(model.parameters(), method.parameters()) if p.requires_grad]  # no teachers
    optimizer = build_optimizer(params, cfg, switches.device)
    return Run(
        cfg,
        info,
        switches,
        nets,
        method,
        optimizer,
        switches.grad_scaler(),
        swa,
        train_loader,
        test_split,
        build_grad_sim(cfg, model, method.backbones(), info),
        requested_device=requested_device,
        train_data=train_data,
        dataset=dataset,
    )


def same_data_on_every_rank(cfg: TrainConfig, info: distributed.DistInfo) -> tuple[ArraySplit, ArraySplit, str, str]:
    """The training and test splits, the training split's fingerprint and the dataset they are (`resolve_dataset`'s,
    read once: the run records it), after every rank has checked that it loaded the same images as rank 0
    (distributed.check_same_data: another node may hold another copy, or none)."""
    source = data_source(cfg.data)  # a refusal is raised on every rank after the same gather (build_run leaves)
    dataset = resolve_dataset(cfg.data)
    try:
        train_split, test_split = load_splits(cfg.data, cfg.seed, dataset)
    except DataError as e:  # said on every rank (one process: raised as it is)
        distributed.check_same_data(e, source, info)
        raise
    train_data = train_split.fingerprint()  # (every rank's: another node may hold another copy)
    data = {"training images": train_data, "test images": test_split.fingerprint()} if info.enabled else {}
    distributed.check_same_data(data, source, info)
    return train_split, test_split, train_data, dataset


def same_precision_on_every_rank(switches: perf.Perf, info: distributed.DistInfo) -> None:
    """perf.dtype auto is resolved by each rank for its own device: on GPUs of mixed kinds (one without bf16) some
    ranks trained fp16 with a loss scaler, others bf16, the scaler's skipped steps apart and the epoch's metrics
    (fp16's skip share) reduced over other keys, a hang (helper-147). Refused on every rank in one line."""
    mine = switches.resolved()["dtype"], switches.dtype_reason
    if apart := distributed.apart_from_rank0(mine, info, key=lambda dtype_and_reason: dtype_and_reason[0]):
        r, dtypes = apart
        raise ConfigError(
            f"the ranks train at different precisions (rank 0 {dtypes[0][0]}: {dtypes[0][1]}; rank {r} "
            f"{dtypes[r][0]}: {dtypes[r][1]}): set perf.dtype=fp32 (or fp16 where every rank is a CUDA GPU, "
            "without dist.sync_bn)"
        )


def train_step(run: Run, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Attack, loss, backward, SGD step. Returns device scalars to accumulate (no host sync)."""
    out = run.method.step(run.nets, x, y, run.perf.autocast)
    loss = out.loss
    analysis = run.grad_sim(out.terms, run.scaler.scale) if run.grad_sim else {}  # two extra backwards, off by default
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    distributed.average_gradients(run.method.parameters(), run.dist)  # DDP syncs only the network's gradients
    scale = run.scaler._scale.clone() if run.scaler.is_enabled() else None  # (made by scale() above)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    if scale is not None:  # fp16: the scaler skipped this step (its gradients not finite) where it lowered the scale
        analysis = analysis | {"scaler_skipped": (run.scaler._scale < scale).float()}  # a device value: no sync
    return {"loss": loss.detach(), **{k: v.detach() for k, v in out.terms.items()}, **out.sums, **analysis}


def train_epoch(run: Run, epoch: int, on_progress=None) -> dict[str, float]:
    """One epoch; `on_progress(row)` is called at each log interval (the run directory's progress.json)."""
    cfg, loader = run.cfg, run.train_loader
    loader.set_epoch(epoch)
    lr = run.method.lr_at(epoch)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    if run.method.fresh_optimizer_at(epoch):
        run.optimizer.state.clear()  # no momentum from the stage before
        seed_momentum(run.optimizer)
    begun, first = time.perf_counter(), {}
    # the epoch-start pass and the first step build the graphs: in a process's first epoch, and in the first epoch
    # of a new stage (ARREST's fine-tuning: the eval-mode attack and the teacher), timed apart from the pace
    compiling = run.perf.compiled and (not run.warm or run.method.fresh_optimizer_at(epoch))
    graphs_before = perf.dynamo_counts() if run.perf.compiled else None
    batches = iter(loader)
    # ~balance_images images over all ranks (METHOD 4's ~1024), each rank measuring its share of its own batches
    share = math.ceil(cfg.method.balance_images / (cfg.batch_size * run.dist.world_size))
    head = list(itertools.islice(batches, share))
    extra = run.method.on_epoch_start(run.nets, head, run.perf.autocast, epoch)
    run.method.train()
    run.nets.raw.train()
    totals: dict[str, torch.Tensor] = {}
    bar = progress_bar(
        total=len(loader),
        desc=f"epoch {epoch}/{cfg.epochs}" + (" (compiling)" if compiling else ""),
        leave=False,
        dynamic_ncols=True,
        disable=not run.dist.is_main,
    )
    start, images, first_images = time.perf_counter(), 0, 0
    for i, (x, y) in enumerate(itertools.chain(head, batches), 1):
        for k, v in train_step(run, x, y).items():
            totals[k] = totals.get(k, 0) + v
        if compiling and not first:
            run.warm = True
            first["first_step_seconds"] = round(synced_seconds(begun, run.perf.device), 2)
            first["epoch_start_seconds"] = round(start - begun, 2)  # the balance pass, its compiling included
            first_images = images + len(y)
            bar.set_description(f"epoch {epoch}/{cfg.epochs}")
        run.step += 1
        run.swa.maybe_update(run.nets.raw, epoch, run.step)
        images += len(y)
        if i % cfg.log_every == 0 or i == len(loader):
            # host sync, once per log interval; summed over ranks, so every rank takes the same decision below (a
            # rank that stopped alone would leave the others waiting in their next gradient all-reduce)
            loss_sum = distributed.all_reduce_sum(totals["loss"].detach().float().clone(), run.dist)
            mean_loss = float(loss_sum) / (i * run.dist.world_size)
            if not math.isfinite(mean_loss):
                bar.close()
                raise Diverged(
                    f"the loss became {mean_loss} in epoch {epoch} (by step {i}): training diverged; the last good "
                    "checkpoint is kept. Try a lower optim.lr (or perf.dtype=fp32), then `arat train --resume`"
                )
            bar.set_postfix(loss=f"{mean_loss:.3f}")
            if on_progress:
                elapsed = time.perf_counter() - start
                on_progress({"epoch": epoch, "step": i, "steps": len(loader), "loss": round(mean_loss, 5),
                             "seconds": round(elapsed, 2),
                             "images_per_s": round(images * run.dist.world_size / elapsed, 1)})  # fmt: skip
        bar.update(1)
    bar.close()
    seconds = synced_seconds(start, run.perf.device)
    # the pace: a compiling epoch's first step (its graphs built) left out (helper-156: ~7x slow on a GPU)
    counted, timed = images, seconds
    compiled_in = first["first_step_seconds"] - first["epoch_start_seconds"] if first else 0.0
    if first and images > first_images and seconds > compiled_in:
        counted, timed = images - first_images, seconds - compiled_in
    throughput = round(counted * run.dist.world_size / timed, 1)
    timing = {"lr": lr, "epoch_seconds": round(seconds, 3), "images_per_s": throughput}
    # METHOD 9's cost model is AR-AT's (an ablation's too), without grad-sim's two extra backwards: achieved TFLOP/s
    if cfg.method.name == "arat" and run.grad_sim is None:
        if run.step_flops is None:
            run.step_flops = perf.arat_step_flops(run.nets.raw, cfg.attack.num_steps, run.perf.device)
        timing["tflop_per_s"] = float(f"{throughput * run.step_flops / 1e12:.4g}")
    if run.perf.attack_graphs is not None:  # this process's captured attacks so far (an eager fallback shows here)
        timing["cuda_graphs"] = run.perf.attack_graphs.stats()
    if graphs_before is not None:  # issue 9's figure: after the first epoch, no graph made and no break (recompiles)
        timing["compile"] = {k: v - graphs_before[k] for k, v in perf.dynamo_counts().items()}
    row = summarize(totals, i, images, run.dist) | extra | timing | first
    if run.scaler.is_enabled():
        row["loss_scale"] = float(run.scaler.get_scale())
        check_scaler(row, epoch, i)
    return row


def check_scaler(row: dict, epoch: int, steps: int) -> None:
    """fp16: an epoch whose steps the loss scaler mostly skipped (non-finite gradients every step, with a finite
    loss) trained nothing while the scale fell towards 0; it stops here, as a diverged loss does. Not for the few
    skips of the scale's start (2^16 backs off over ~5-10 steps: most of a very short epoch's)."""
    skipped = row.get("scaler_skipped") or 0.0
    if skipped > 0.5 and skipped * steps >= 16 or row["loss_scale"] < 2.0**-24:
        raise Diverged(
            f"fp16's loss scaler skipped {100 * skipped:.0f}% of epoch {epoch}'s steps (their gradients were not "
            f"finite; scale now {row['loss_scale']:.3g}): the weights barely moved. The last good checkpoint is "
            "kept; set perf.dtype=fp32 (or bf16 where the device has it), then `arat train --resume`"
        )


def synced_seconds(start: float, device: torch.device) -> float:
    """Seconds since `start` (perf_counter), once the device's queued work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


PER_COUNTED_STEP = ("grad_sim", "grad_conflict")  # means over the steps counted in `grad_sim_steps`


def summarize(totals: dict[str, torch.Tensor], steps: int, images: int, info: distributed.DistInfo) -> dict:
    """Per-epoch means: loss terms per step, correct counts as accuracies (summed over ranks), the gradient
    similarity over the steps it was finite in."""
    row, summed = {}, {}
    for k, v in totals.items():  # every rank reduces the same keys in the same order
        summed[k] = float(distributed.all_reduce_sum(v.detach().float().clone(), info))
    counted = summed.pop("grad_sim_steps", None)
    for k, v in summed.items():
        if k.startswith("correct_"):
            row["train_acc_" + k.removeprefix("correct_")] = round(v / (images * info.world_size), 4)
        elif k in PER_COUNTED_STEP and counted is not None:
            row[k] = round(v / counted, 5) if counted else None
        else:
            row[k] = round(v / (steps * info.world_size), 5)
    return row


def epoch_line(row: dict, epochs: int, cost=lambda epoch: 1.0, checkpoint_seconds: float = 0.0) -> str:
    parts = [f"epoch {row['epoch']}/{epochs}"]
    keys = ("loss", "cls", "inv", "adv_weight", "grad_sim", "grad_conflict", "lr")
    parts += [f"{k} {row[k]:.4g}" for k in keys if row.get(k) is not None]
    parts += [f"{k.removeprefix('train_')} {100 * row[k]:.1f}%" for k in row if k.startswith("train_acc_")]
    parts += [f"{row['images_per_s']:.0f} img/s"]
    if row.get("tflop_per_s") is not None:  # summed over ranks: past 1,000 on a few GPUs
        tflops = row["tflop_per_s"]
        parts.append(f"{tflops:,.0f} TFLOP/s" if tflops >= 1000 else f"{tflops:.3g} TFLOP/s")
    parts.append(f"{row['epoch_seconds']:.0f}s")
    if "first_step_seconds" in row:
        parts.append(f"(compiling: {row['first_step_seconds']:.0f}s to the first step)")
    made = row.get("compile") or {}
    if made.get("graphs") or made.get("graph_breaks"):  # after the first epoch, recompiles (or a new stage's role)
        graphs, breaks = made["graphs"], made["graph_breaks"]
        parts.append(f"({graphs} graph{'s' * (graphs != 1)} compiled, {breaks} graph break{'s' * (breaks != 1)})")
    if made.get("eager_frames"):  # dynamo gave up on a function (its recompile limit, an error): now it runs eagerly
        n = made["eager_frames"]
        parts.append(f"({n} function{'s' * (n != 1)} left uncompiled by dynamo: TORCH_LOGS=recompiles says why)")
    if row.get("cuda_graphs", {}).get("eager_calls"):
        parts.append(f"({row['cuda_graphs']['eager_calls']} attacks ran uncaptured: see the warning above)")
    if row["epoch"] < epochs:  # at this epoch's pace, less the compiling that only the first epoch pays
        # epoch_seconds starts after the epoch-start pass, first_step_seconds before it: only the part of the
        # first step's time inside epoch_seconds is taken off (the whole made the estimate low, even 0s)
        pace = row["epoch_seconds"] - (row.get("first_step_seconds", 0.0) - row.get("epoch_start_seconds", 0.0))
        # `cost(epoch)`: an epoch's relative cost (ARREST's fine-tuning epochs attack, its standard ones do not)
        left = sum(cost(e) for e in range(row["epoch"] + 1, epochs + 1)) / cost(row["epoch"])
        parts.append(f"~{clock(max(pace, 0.0) * left + checkpoint_seconds * (epochs - row['epoch']))} of training left")
    return "  ".join(parts)


def clock(seconds: float) -> str:
    """A duration for people: 45s, 12m, 3h05m, 2d04h."""
    s = round(seconds)
    if s < 90:
        return f"{s}s"
    if s < 90 * 60:
        return f"{round(s / 60)}m"
    if s < 48 * 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def start_line(run: Run, out: Path | None = None) -> str:
    """What a run trains and how, its seed and folder, and the engine's version (a log alone reproduces it)."""
    cfg = run.cfg
    dataset = run.dataset or resolve_dataset(cfg.data)
    per_rank = run.train_loader.num_images  # (under torchrun each process's share: the set's size said first)
    images = f"{run.train_loader.num_total} train images"
    images += f", {per_rank} per process" if run.dist.world_size > 1 else ""
    return (
        f"arat: recipe={cfg.recipe} method={cfg.method.name} model={cfg.model.arch}"
        f"{'' if cfg.model.arch != 'resnet18' or cfg.model.width == 64 else f'(width {cfg.model.width})'} "
        f"split_bn={cfg.model.split_bn} data={dataset}/{cfg.data.backend} ({images}) "
        f"{run.perf.summary()} world_size={run.dist.world_size}"
        + (" sync_bn (BN statistics over every rank's batch)" if cfg.dist.sync_bn and run.dist.enabled else "")
        + f" seed={cfg.seed}"
        + (f" out={out} (its config.json holds every setting)" if out is not None else "")
        + f"\n{version_line()}"
        + (f"\nnote: {note}" if (note := distributed.idle_gpus_note(run.dist, run.perf.device)) else "")
    )


def final_model(run: Run) -> nn.Module:
    """The network to evaluate and save: the SWA average (with re-estimated adv BNs) when SWA is on. Under DDP its
    BN statistics are the ranks' average (each rank's moving averages saw only its own batches: rank 0's alone
    were a 1/N sample)."""
    if not run.cfg.swa.enabled:
        distributed.average_bn_statistics(run.nets.raw, run.dist, sum_counts=False)
        set_sync_bn(run.nets.raw, False)  # (below)
        return run.nets.raw
    # the adv BNs are re-estimated on the last epoch's batches, also in a run resumed after its last epoch (where
    # no epoch ran in this process to set the loader's epoch)
    run.train_loader.set_epoch(max(run.epoch, 1))
    model = run.swa.averaged_model(run.nets.raw, run.train_loader, run.cfg.attack, run.perf.autocast,
                                   show=run.dist.is_main)  # fmt: skip
    # each rank re-estimated on its shard: the whole set (synchronized, each holds the global batches' already)
    distributed.average_bn_statistics(model, run.dist, sum_counts=not run.cfg.dist.sync_bn)
    set_sync_bn(model, False)  # the evaluation's ranks take unequal chunks: no all-reduce may pair them
    return model


def run_training(cfg: TrainConfig, out_dir: str | Path, resume: bool = False, evaluate_at_end: bool = True) -> Path:
    """Train (or resume) a run in `out_dir`, then evaluate it; returns the run directory."""
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise RunDirError(f"{Path(out_dir)} is a file; pick a directory for --out")
    from_checkpoint = resume and (Path(out_dir) / "checkpoints" / LATEST).is_file()
    if from_checkpoint:
        refused_since_it_started(cfg, Path(out_dir) / "checkpoints" / LATEST)
    run = build_run(cfg, from_checkpoint=from_checkpoint)
    try:
        # rank 0's: a default --out is named from the clock on each rank, and ranks straddling a second named two
        rundir = RunDir(distributed.gather_objects(str(out_dir), run.dist)[0])
        with opened_by_rank0(run, rundir, resume):
            train_and_finish(run, rundir, resume, evaluate_at_end)
    except BaseException:  # a failed rank leaves its group at once (as `arat eval`'s do): no wait for the others
        distributed.shutdown(run.dist, wait=False)
        raise
    finally:  # (a later run in this process compiles its own)
        perf.forget_compiled_roles()
    distributed.shutdown(run.dist)
    return rundir.path


def refused_since_it_started(cfg: TrainConfig, checkpoint: Path) -> None:
    """A resume whose config today's engine refuses to train with (build_run checks the same): where the checkpoint's
    own config is refused too, an older version of this engine started the run so, and editing config.json cannot
    help (the resume would refuse the edit as a change to what the run trains): said so. Otherwise the refusal as it
    is (config.json edited since, e.g. an empty data folder: restore it)."""
    try:
        check_trainable(cfg)
        check_method(cfg)
    except ConfigError as e:
        try:  # read only on this refusal: the config the run's epochs trained with
            trained = from_dict(load_checkpoint(checkpoint)["config"], "the checkpoint's config")
            check_trainable(trained)
            check_method(trained)
        except ConfigError:
            run = checkpoint.parents[1]
            raise ConfigError(f"{e} (an older version of this engine started {run} so: the run cannot be resumed; "
                              f"`arat eval {shell_word(run)}` and `arat export` still read it)") from None  # fmt: skip
        except (UserError, KeyError, TypeError):  # no readable config there: the refusal as it is
            pass
        raise


RESUME_LOCK_WAIT_S = 120.0  # a resume waits this long for another holder of the run (a stopped job still leaving)


@contextlib.contextmanager
def opened_by_rank0(run: Run, rundir: RunDir, resume: bool):
    """Rank 0 opens the run directory (the only writer); every rank learns whether it could. On a refusal on rank 0
    alone (--out holding another run, unwritable) the other ranks went on building and training until torchrun
    killed them; now every rank stops at once with the same line. Any other error there (a disk's, reading the
    run's records) is raised on rank 0 as it is, and said to the other ranks, which waited in the gather for the
    group's timeout where torchrun did not stop them (another node)."""
    with contextlib.ExitStack() as stack:
        problem, error = None, None
        if run.dist.is_main:
            try:
                # a resume writes into the run itself: --out is no way out
                unwritable = "make it writable, or copy the run to a writable folder and resume the copy"
                said, wait_s = (unwritable, RESUME_LOCK_WAIT_S) if resume else ("pick a writable --out", 0.0)
                stack.enter_context(rundir.open_for_writing(resume, said, wait_s))
                problem = other_data_on_resume(run, rundir) if resume else None
            except RunDirError as e:
                problem = str(e)
            except Exception as e:
                if not run.dist.enabled:
                    raise
                problem, error = f"rank 0 could not open or read {rundir.path}: {e} (rank 0 says more)", e
        problem = distributed.gather_objects(problem, run.dist)[0]
        if problem is not None:  # (every rank raises: run_training leaves the group)
            if error is not None:
                raise error
            raise RunDirError(problem)
        yield


def other_data_on_resume(run: Run, rundir: RunDir) -> str | None:
    """A resume that would train on other data than the checkpointed epochs did: with data.synthetic_fallback, the
    data is resolved again in each process (CIFAR-10 downloaded since, or its folder gone), and the run would mix
    the two without a word (env.json recorded only the first); or other images under the same dataset name (env.json's
    training-set fingerprint)."""
    record = rundir.training_record()
    trained, now = record.get("dataset"), run.dataset or resolve_dataset(run.cfg.data)
    if not rundir.checkpoint(LATEST).exists():
        return None
    if trained is not None and trained != now:
        return (f"{rundir.path} trained on {trained}, but {now} would be used now (data.synthetic_fallback resolves "
                f"the data again): make {trained} available again (--data-dir), or start a new run")  # fmt: skip
    # the same name, other images: another copy of the dataset (the official one and the JPEG-degraded one), or a
    # relative data.data_dir ("data", the default) read from another working directory
    fingerprint = record.get("train_data")  # (synthetic data is the config's: its resume check covers it)
    if now != "synthetic" and fingerprint not in (None, run.train_data) and run.train_data is not None:
        where = Path(run.cfg.data.data_dir).resolve()
        return (
            f"{rundir.path} trained on other {now} images than {where} holds (training-set fingerprint "
            f"{fingerprint}, now {run.train_data}): point --data-dir at the data it trained on, or start a new run"
        )
    return None


def swa_from_now(run: Run) -> str:
    """SWA turned on (config.json) for the resume of a run that trained without it: it averages the steps still to
    come, if any of them is a multiple of swa.every (else the run would train to the end and then stop)."""
    swa, steps, epochs = run.cfg.swa, len(run.train_loader), run.cfg.epochs
    first, updates = max(swa.start_epoch, run.epoch + 1), run.swa.updates(steps, epochs, done=run.epoch)
    if not updates:
        raise UserError(
            f"SWA would average nothing: it was off for the {run.epoch} epochs trained, and epochs "
            f"{first}-{epochs} hold no step that is a multiple of swa.every={swa.every} "
            f"({steps} steps per epoch); lower swa.every or raise epochs in config.json, or set swa.enabled=false"
        )
    return f"SWA was off for the {run.epoch} epochs trained: it averages from epoch {first} on ({updates} updates)"


def check_checkpoint_kept(rundir: RunDir) -> None:
    """A resumed run without checkpoints/latest.pt whose records say it trained (epoch rows past the first, or a
    final.pt) lost its checkpoint (deleted, or never copied): refused. Started over, it emptied metrics.jsonl and
    said it had no checkpoint yet. (One row and no checkpoint: stopped between epoch 1's row and its checkpoint.)"""
    if rundir.checkpoint(LATEST).exists():
        return
    if rundir.checkpoint(FINAL).exists():  # finished; latest.pt deleted (to save disk?)
        evaluate = f"`arat eval {shell_word(rundir.path)}`"
        raise RunDirError(f"{rundir.path} finished its training (checkpoints/{FINAL}): {evaluate} "
                          f"evaluates it; training it further needs its checkpoints/{LATEST}, removed (by hand or "
                          "reproduce.sh's PRUNE=1): copy it back, or train on in a new run")  # fmt: skip
    trained = max((r.get("epoch", 0) for r in rundir.metrics()), default=0)
    if trained >= 2:
        raise RunDirError(
            f"{rundir.path} trained {trained} epochs (metrics.jsonl) but has no checkpoints/{LATEST}: copy it back "
            "to continue the run; to train it again from epoch 1, start it in a new folder"
        )


def same_checkpoint_view(rundir: RunDir, resume: bool, info: distributed.DistInfo) -> None:
    """Under torchrun, whether every rank resumes, and sees the run's checkpoints/latest.pt, alike: each rank decided
    to resume or start afresh on its own view (`arat train --recipe X --out RUN` resumes where RUN/config.json is),
    and a rank on a node without the run's folder (or with a stale copy) trained from epoch 1 beside ranks resuming
    at epoch k, their collectives never matching (a hang up to dist.timeout_min; helper-147). Views that differ are
    refused on every rank in one line."""
    path = rundir.checkpoint(LATEST)
    if apart := distributed.apart_from_rank0((resume, resume and path.exists()), info):
        other, views = apart
        (resumes, finds), (other_resumes, other_finds) = views[0], views[other]
        if resumes != other_resumes:
            raise RunDirError(
                f"rank 0 {'continues' if resumes else 'starts'} {rundir.path}, rank {other} "
                f"{'continues' if other_resumes else 'starts'} it (one finds its config.json, one does not): every "
                "rank reads the run's folder; put it on storage every node reads, at the same path, then start again"
            )  # fmt: skip
        raise RunDirError(
            f"rank 0 {'finds' if finds else 'does not find'} {path}, rank {other} "
            f"{'finds' if other_finds else 'does not'}: every rank of a resume reads the run's folder; put it on "
            "storage every node reads, at the same path, then resume again"
        )


def train_and_finish(run: Run, rundir: RunDir, resume: bool, evaluate_at_end: bool) -> None:
    cfg = run.cfg
    same_checkpoint_view(rundir, resume, run.dist)
    if resume:
        check_checkpoint_kept(rundir)
    say = print if run.dist.is_main else (lambda *a, **k: None)
    if resume and rundir.checkpoint(LATEST).exists():  # read before anything is written: a refusal changes nothing
        try:
            run.load_state_dict(load_checkpoint(rundir.checkpoint(LATEST)))
        except CheckpointError as e:  # cut short in a copy, or a disk that lost it: the run cannot go on without it
            raise RunDirError(f"{e}: copy it again from where the run came from (the run is left as it was)") from None
    # a node's stale copy of the run's folder: other epochs on other ranks, a hang at the end
    if resume and (apart := distributed.apart_from_rank0(run.epoch, run.dist)):
        other, epochs = apart
        raise RunDirError(
            f"rank 0 resumes {rundir.path} after epoch {epochs[0]}, rank {other} after epoch {epochs[other]} (its "
            "node holds another copy of the run's folder): every rank of a resume reads the same folder; put it "
            "on storage every node reads, at the same path, then resume again"
        )
    if run.dist.is_main:  # the device as asked for (auto, cuda...): a resume elsewhere resolves it again
        rundir.save_config(replace(cfg, perf=replace(cfg.perf, device=run.requested_device)))
        # what is trained on, and how: the switches as resolved here (auto's choice; each resume records its own)
        started = {"dataset": run.dataset or resolve_dataset(cfg.data), "train_data": run.train_data,
                   "world_size": run.dist.world_size, "perf": run.perf.resolved()}  # fmt: skip
        rundir.record_environment(environment(run.perf.device) | started, resume)
    swa_notice = swa_from_now(run) if run.swa.started_on_resume and run.epoch < cfg.epochs else None
    kept = []  # the metrics rows of the epochs a resume keeps
    if resume and run.dist.is_main:  # rows written after the checkpoint (a kill in between) are redone
        rundir.remove_stale_temp_files()
        kept = [r for r in rundir.metrics() if r.get("epoch", 0) <= run.epoch]
        rundir.rewrite_metrics(kept)
    final_exists = evaluated = False
    if resume and run.epoch >= cfg.epochs:  # rank 0's view of the run directory, shared: every rank takes one branch
        final_exists, evaluated = distributed.gather_objects(
            (rundir.checkpoint(FINAL).exists(), (rundir.path / "results.json").exists()) if run.dist.is_main else None,
            run.dist,
        )[0]
    if final_exists:
        final = read_checkpoint(rundir.checkpoint(FINAL), own=True) if evaluate_at_end and not evaluated else {}
        if final.get("evaluate_at_end"):  # stopped during the evaluation that ends the run (not a --no-eval run)
            say(f"{rundir.path} finished its {cfg.epochs} epochs; its evaluation did not end: evaluating its final "
                "network (the chunks it finished are kept)")  # fmt: skip
            model = copy.deepcopy(run.nets.raw)
            model.load_state_dict(final["model"])
            del final  # (its host copy of the weights, through the evaluation)
            set_sync_bn(model, False)  # as final_model's: the evaluation's ranks take unequal chunks
            evaluate_and_record(run, rundir, model, say)
            return
        evaluate = f"`arat eval {shell_word(rundir.path)}`"
        say(f"{rundir.path} finished its {cfg.epochs} epochs already: nothing to train ({evaluate} "
            "evaluates it again; raise epochs in its config.json to train on)")  # fmt: skip
        return
    if run.dist.is_main:  # (built on rank 0 only: it runs git)
        say(start_line(run, rundir.path))
    if resume and not run.epoch:
        say(f"{rundir.path} has no checkpoint yet (none is written before epoch 1 ends): starting it from epoch 1")
    if notice := data_notice(cfg.data, run.dataset):
        say(notice)
    for notice in (schedule_notice(cfg), ignored_keys_notice(cfg.method)):
        if notice and run.epoch < cfg.epochs:
            say(notice)
    if run.epoch:
        say(f"resuming after epoch {run.epoch}/{cfg.epochs} from {rundir.checkpoint(LATEST)}")
    if swa_notice:
        say(swa_notice)
    elif run.swa.kept is not None and run.epoch < cfg.epochs:
        say(
            f"SWA is off (config.json): the final network is the plain one; the checkpoint's average of "
            f"{run.swa.kept['count']} snapshots is kept, not updated (swa.enabled=true again averages on from it)"
        )
    elif cfg.swa.enabled and run.epoch < cfg.epochs:  # swa.every counts steps: a batch per process changes it
        steps, n = len(run.train_loader), run.swa.updates(len(run.train_loader), cfg.epochs, done=run.epoch)
        say(f"SWA averages {n} snapshot{'s' * (n != 1)} from here: every {cfg.swa.every} steps from epoch "
            f"{max(cfg.swa.start_epoch, run.epoch + 1)} ({steps} steps per epoch)")  # fmt: skip
    if run.perf.compiled and run.epoch < cfg.epochs:
        say("torch.compile builds the step's graphs during the first steps (minutes on a CPU; Inductor's on-disk "
            "cache shortens later runs); the first epoch's line gives the time")  # fmt: skip
    if resume and run.epoch:
        set_aside_earlier_end(run, rundir, say)
    if run.dist.world_size > 1:
        say(f"train.batch_size={cfg.batch_size} is per process: {cfg.batch_size * run.dist.world_size} images per "
            f"step over {run.dist.world_size} processes (the recipes' batch is for one process; "
            f"--set train.batch_size=N sets each process's)")  # fmt: skip
    progress = (lambda row: rundir.write_json("progress.json", row, durable=False)) if run.dist.is_main else None
    # wall time of the whole run: a resume adds this process's to the time the earlier processes' rows reached
    earlier = [r["wall_seconds"] for r in kept if "wall_seconds" in r]
    wall = time.perf_counter() - (earlier[-1] if earlier else 0.0)
    for epoch in range(run.epoch + 1, cfg.epochs + 1):
        row = {"epoch": epoch} | train_epoch(run, epoch, progress)
        check_finite_weights(run, epoch)  # the epoch's last update came after its last loss
        run.epoch = epoch
        row["wall_seconds"] = round(time.perf_counter() - wall, 2)
        saving = time.perf_counter()
        state = run.state_dict()  # a collective under DDP (per-rank RNG states): every rank calls it
        if run.dist.is_main:
            rundir.append_metrics(row)
            rundir.save_checkpoint(LATEST, state)
        # the checkpoint's write, every epoch (seconds for WRN-34-10 with SWA), is in the time left too
        say(epoch_line(row, cfg.epochs, run.method.epoch_cost, time.perf_counter() - saving))
        del state  # it shares the optimizer's momentum dicts: held, it kept them through the closing evaluation
    finish(run, rundir, evaluate_at_end, say)


def check_finite_weights(run: Run, epoch: int) -> None:
    """Before epoch `epoch`'s checkpoint: every weight finite (one host sync). The losses are read before each
    update, so an epoch whose last update made a weight inf or NaN passed the loss check, and its checkpoint would
    make every resume diverge at once. The ranks hold the same weights: they take the same decision."""
    tensors = [p.detach() for p in itertools.chain(run.nets.raw.parameters(), run.method.parameters())]
    if tensors and not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
        raise Diverged(
            f"a weight became inf or NaN in epoch {epoch}: training diverged; the last good checkpoint is kept. Try "
            "a lower optim.lr (or perf.dtype=fp32), then `arat train --resume`"
        )


def set_aside_earlier_end(run: Run, rundir: RunDir, say) -> None:
    """A finished run trained on (train.epochs raised in its config.json): its earlier end's final network and
    results (a later `arat eval`'s eval.json, eval/flags.json) move to previous-epoch-N/, so that neither `arat
    eval`, `arat table` nor `arat export` reads them as this run's while it trains on or once it ends (a stop during
    the new final evaluation found results.json and kept the shorter run's). The chunk records stay: they are keyed
    by the network's weights."""
    if not run.dist.is_main:
        return
    # eval/flags.json too: a later evaluation merges its attacks into it, beside the earlier network's other entries
    files = [rundir.checkpoint(FINAL), *(rundir.path / n for n in ("results.json", "eval.json", "eval/flags.json"))]
    present = [f for f in files if f.exists()]
    if not present:
        return
    end = rundir.path / f"previous-epoch-{run.epoch}"
    n = 2
    while end.exists():
        end, n = rundir.path / f"previous-epoch-{run.epoch}-{n}", n + 1
    end.mkdir()
    for f in present:
        f.replace(end / f.name)
    say(f"training on past its earlier end (epoch {run.epoch}): {', '.join(f.name for f in present)} moved to {end}")


def release_training_memory(run: Run) -> None:
    """Before the evaluation ending a run (its checkpoints are on disk): the last step's gradients, the optimizer's
    momentum, SWA's average (the final network holds it now) and the training attacks' CUDA graphs are dropped, and
    on CUDA the freed blocks go back to the device. The evaluation sizes its chunks by the device's total memory,
    not by what training left allocated. The momentum buffers are dropped from their per-parameter dicts, which
    any state_dict of the optimizer still referenced shares (clearing the mapping alone freed none: helper-144)."""
    run.optimizer.zero_grad(set_to_none=True)
    for state in run.optimizer.state.values():
        state.clear()
    run.optimizer.state.clear()
    run.swa.average = {}
    if run.perf.attack_graphs is not None:
        run.perf.attack_graphs.release()
    if run.perf.device.type == "cuda":
        if run.perf.compiled and run.cfg.perf.compile_mode != "default":  # Inductor's own CUDA graphs (its trees)
            from torch._inductor.cudagraph_trees import reset_cudagraph_trees  # keep the training step's pool

            reset_cudagraph_trees()  # (the evaluation compiles in the default mode: it builds none)
        torch.cuda.empty_cache()


def trained_state(method: nn.Module) -> dict[str, torch.Tensor]:
    """The method's state for final.pt without its frozen networks (ARREST's teacher: a copy of the network at the
    end of its first stage, 185 MB for WRN-34-10, which nothing reads from final.pt; latest.pt keeps it to resume).
    Trained modules stay (LBGAT's clean model, AR-AT's predictors)."""
    frozen = tuple(
        f"{name}."
        for name, child in method.named_children()
        if any(True for _ in child.parameters()) and not any(p.requires_grad for p in child.parameters())
    )
    return {k: v for k, v in method.state_dict().items() if not k.startswith(frozen)}


def finish(run: Run, rundir: RunDir, evaluate_at_end: bool, say) -> None:
    model = final_model(run)
    if run.dist.is_main:
        rundir.save_checkpoint(
            FINAL,
            {
                "model": model.state_dict(),
                "method": trained_state(run.method),
                "config": run.cfg.to_dict(),
                "epoch": run.epoch,
                "evaluate_at_end": evaluate_at_end,  # a resume after a stop during that evaluation finishes it
            },
        )
    if evaluate_at_end:
        evaluate_and_record(run, rundir, model, say)
    else:
        say(f"run saved in {rundir.path}")


def evaluate_and_record(run: Run, rundir: RunDir, model: nn.Module, say) -> None:
    """The evaluation ending a run: every rank takes its share of the chunks, on rank 0's network (the final
    network's BN statistics are the ranks' average already; a resumed end's final.pt is read by rank 0's choice);
    rank 0 writes the flags and results.json."""
    release_training_memory(run)
    distributed.broadcast_state(model, run.dist)
    results = evaluate(model, run.test_split, run.cfg.eval, run.perf.device, run.cfg.seed, run.cfg.perf,
                       run.dist, rundir.path / "eval")  # fmt: skip
    say(f"results: {format_results(results)}")  # before the write: a full disk loses nothing computed
    if run.dist.is_main:
        write_flags(rundir.path / "eval", results)
        rundir.write_json(
            "results.json",
            {
                "recipe": run.cfg.recipe,
                "dataset": run.dataset or resolve_dataset(run.cfg.data),  # synthetic where the fallback replaced it
                "test_data": run.test_split.fingerprint(),  # which test images (another copy has the same name)
                "epochs": run.epoch,
                "model": "adv-bn",
                "swa": run.cfg.swa.enabled,
                "results": summary(results),
                "environment": environment(run.perf.device) | {"world_size": run.dist.world_size},
            },
        )
    say(f"run saved in {rundir.path}")


CHECKPOINT_KEYS = {"epoch", "step", "model", "method", "optimizer", "scaler", "swa", "rng", "config"}  # Run.state_dict


def load_checkpoint(path: Path) -> dict:
    """A training checkpoint, on the CPU: load_state_dict moves weights and optimizer state to their parameters'
    device, and the RNG states must stay CPU byte tensors. Read with weights_only (tensors and plain data)."""
    state = read_checkpoint(path, own=True)
    if not isinstance(state, dict) or not state.keys() >= CHECKPOINT_KEYS:
        missing = "/".join(sorted(CHECKPOINT_KEYS - state.keys())) if isinstance(state, dict) else "every part"
        if isinstance(state, dict) and {"model", "rng_cpu"} <= state.keys():  # the first engine's (2026-11) layout
            raise RunDirError(f"{path} was written by an older version of this engine (its RNG states as rng_cpu/"
                              "rng_cuda), which cannot be resumed: `arat eval` and `arat export` still read the run, "
                              "or train it again in a new folder")  # fmt: skip
        raise RunDirError(f"{path} is not a training checkpoint of this engine (no {missing}); copy the run's own "
                          "again, or start the run over in a new folder")  # fmt: skip
    return state


def load_run_config(run_dir: str | Path) -> TrainConfig:
    rundir = RunDir(run_dir)
    if not (rundir.path / "config.json").exists():
        raise RunDirError(f"{rundir.path} holds no run (no config.json); pass the --out of an earlier `arat train`")
    try:
        return from_dict(rundir.read_json("config.json"), str(rundir.path / "config.json"))
    except UserError:  # ConfigError: a bad value, said in one line already
        raise
    except (ValueError, TypeError, AttributeError) as e:  # not JSON, not UTF-8, not a config's shape
        raise RunDirError(
            f"{rundir.path / 'config.json'} is not a config this engine wrote ({type(e).__name__}: {e}); restore "
            "it or start a new run"
        ) from None
