"""Multi-process runs under torchrun (DDP): rank discovery, process group, and rank-aware printing."""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import pickle
import secrets
import socket
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from .config import DistConfig
from .errors import UserError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    gpu: int = 0  # the CUDA device of this process: LOCAL_RANK, or 0 where each process sees only its own GPU

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


_joined = False  # this process joined a process group in `init` (whether it has left it since or not)


def joined_a_group() -> bool:
    """Whether `init` joined a process group in this process: its collectives' threads may outlive the group (see
    engine.cli.leave_without_finalizing)."""
    return _joined


def init(cfg: DistConfig, device_type: str) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); a no-op otherwise."""
    global _joined
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    info = DistInfo(int(os.environ["RANK"]), world_size, local_rank)
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device_type == "cuda" else "gloo")
    if backend == "nccl" and device_type != "cuda":  # before any group: NCCL's error came as a traceback per rank
        raise UserError("dist.backend=nccl needs CUDA devices: on a CPU use dist.backend=gloo (or auto)")
    if device_type == "cuda":
        info.gpu = gpu_index(local_rank, torch.cuda.device_count())
        torch.cuda.set_device(info.gpu)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(minutes=cfg.timeout_min))
        _joined = True
    agree_on_group_token(info)
    tag_engine_warnings(info.rank)
    if device_type == "cuda":
        try:
            check_distinct_gpus(info)
        except UserError:
            dist.destroy_process_group()  # no collective ran yet: every rank leaves the same way
            raise
    return info


class _RankTag(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = f"[rank {self.rank}] {record.msg}"
        return True


def tag_engine_warnings(rank: int | None) -> None:
    """The engine's own warnings (attacks/graphs.py: an attack's capture failed, it synchronizes with the host) are
    printed by each rank that meets them: each says which rank it is (eight bare copies said nothing of where).
    None: untagged again (the group left)."""
    log = logging.getLogger("engine")
    for old in [f for f in log.filters if isinstance(f, _RankTag)]:
        log.removeFilter(old)
    if rank is not None:
        log.addFilter(_RankTag(rank))


def leave_after_an_error(rank: int) -> None:
    """Leave the process group on the way out of an error, without raising (the error being handled is the one to
    tell). An NCCL group is aborted, not destroyed: NCCL's shutdown waits for the rank's pending work, which a
    collective that a failed peer never joins never finishes (until NCCL's timeout, `dist.timeout_min`). Gloo's
    destroy is kept (it returned at once in the two-rank tests); the NCCL abort has not run (no NCCL group was ever
    formed here)."""
    try:
        backend = dist.get_backend()
    except Exception:  # any: destroyed as any other group
        backend = None
    try:  # the ranks waiting in a store exchange this rank will not reach stop at once (wait_for_entries)
        # the round it will not reach, used up here: a later group in this process on the same store starts past it
        dist.distributed_c10d._get_default_store().set(_failed_key(_next_round()), str(rank))
    except Exception as e:  # any: a store gone with its host (the others learn of it from their own store calls)
        logging.getLogger("engine").warning("[rank %s] could not tell the other ranks it stopped: %s", rank, e)
    try:
        abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
        if backend == "nccl" and abort is not None:
            abort()
        else:
            dist.destroy_process_group()
    except Exception as e:  # any: the error being handled is the one to report
        logging.getLogger("engine").warning(
            "[rank %s] leaving the process group after an error failed too: %s", rank, e
        )


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank`'s own draws (its attack noise): a hash of the run's seed and the rank, 63 bits.

    Apart, in their low 32 bits too (all torch's CPU generator keeps), from each other, from every epoch's data seed
    and from `seed`, which drew the initial weights. Before 2026-12-07 it was seed + rank * 2**40: every CPU rank
    drew the same noise (the same low 32 bits: helper-145), and rank 0's noise replayed the stream that drew the
    weights (seed + rank before that drew, at seed 0, rank r's noise from epoch r's data order)."""
    digest = hashlib.sha256(f"arat attack noise:{seed}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def idle_gpus_note(info: DistInfo, device: torch.device) -> str | None:
    """One process on a machine whose other GPUs it leaves idle (no torchrun): what to run instead."""
    count = torch.cuda.device_count() if device.type == "cuda" and not info.enabled else 0
    if count < 2:
        return None
    return (f"{count} GPUs visible, this process uses one ({device}): `torchrun --nproc_per_node {count} -m "
            "engine.cli ...` shares the work among them")  # fmt: skip


def gpu_identity(index: int) -> str:
    """This machine's name and the GPU's UUID (the same GPU seen by two processes reads the same)."""
    props = torch.cuda.get_device_properties(index)
    uuid = getattr(props, "uuid", None)
    ident = str(uuid) if uuid is not None else f"pci {props.pci_domain_id}:{props.pci_bus_id}:{props.pci_device_id}"
    return f"{socket.gethostname()} {ident}"


def shared_gpus(identities: list[str]) -> str | None:
    """`ranks 0 and 1 share GPU ...` when two ranks would run on the same GPU, else None."""
    first: dict[str, int] = {}
    for rank, ident in enumerate(identities):
        if ident in first:
            return f"ranks {first[ident]} and {rank} share one GPU ({ident})"
        first[ident] = rank
    return None


def check_distinct_gpus(info: DistInfo) -> None:
    """Refuse, on every rank alike, two processes on one GPU (e.g. torchrun --nproc_per_node 2 where one GPU is
    visible), which NCCL would end with its own "Duplicate GPU detected" error at the first collective."""
    shared = shared_gpus(gather_objects(gpu_identity(info.gpu), info))
    if shared:
        raise UserError(f"{shared}: start at most one process per GPU (torchrun --nproc_per_node = the GPUs of "
                        "each node), or show each process its own GPU")  # fmt: skip


def gpu_index(local_rank: int, visible: int) -> int:
    """The GPU a process with LOCAL_RANK `local_rank` uses among the `visible` ones: its local rank (torchrun: every
    process sees every GPU of its node), or 0 where a launcher shows each process only its own (CUDA_VISIBLE_DEVICES
    set per process, e.g. srun --gpus-per-task=1)."""
    if local_rank < visible:
        return local_rank
    if visible == 1:
        return 0
    raise UserError(f"LOCAL_RANK {local_rank} but this process sees {visible} GPUs: start at most {visible} processes "
                    "per node (torchrun --nproc_per_node), or show each process its own GPU")  # fmt: skip


def local_device(info: DistInfo, device: torch.device) -> torch.device:
    return torch.device("cuda", info.gpu) if device.type == "cuda" and info.enabled else device


def wrap(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """DDP around the (compiled) network (the network itself outside a process group), broadcasting no buffers
    after wrap time (`no_buffer_sync`): by default each rank's BN normalizes over its own images and keeps its own
    running statistics (with `dist.sync_bn` the network's own BNs, marked by `set_sync_bn`, take both over every
    rank's images; DDP does not). Their average over the ranks is the network's in final.pt and the evaluation,
    every rank's are in the training checkpoints (a resume restores each rank's)."""
    if not info.enabled:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, **no_buffer_sync())


def no_buffer_sync() -> dict[str, bool]:
    """DDP's switch for not broadcasting rank 0's buffers at every forward: `forward_sync_buffers` where torch has
    it (2.13 deprecates `broadcast_buffers`, warning on every rank), else `broadcast_buffers`. The new switch still
    syncs the buffers once at wrap time, when every rank holds the same ones (same seed, or the same checkpoint)."""
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t)
    return t


def average_gradients(params, info: DistInfo) -> None:
    """All-reduce (mean) the gradients of parameters that live outside the DDP module (e.g. AR-AT's predictors),
    as one flat buffer."""
    if not info.enabled:
        return
    grads = [p.grad for p in params if p.grad is not None]
    for g, synced in zip(grads, mean_over_ranks_of(grads, info), strict=True):
        g.copy_(synced)


def mean_over_ranks_of(tensors: list[torch.Tensor], info: DistInfo) -> list[torch.Tensor]:
    """The element-wise means over the ranks of `tensors`, through one flat all-reduce (new tensors; the tensors
    themselves outside a process group)."""
    if not info.enabled or not tensors:
        return tensors
    flat = torch._utils._flatten_dense_tensors(tensors)
    dist.all_reduce(flat)
    flat.div_(info.world_size)
    return list(torch._utils._unflatten_dense_tensors(flat, tensors))


def mean_over_ranks(value: float) -> float:
    """The mean of a per-rank host value over all ranks (a no-op outside a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


_group_token = "0"  # set by `init` for each process group it joins: rank 0's random draw, broadcast


def store_prefix() -> str:
    """This engine's keys in the process group's store, per group: `torchrun --max-restarts` starts the workers
    again on the store the killed ones used (torch keeps its rendezvous store across restarts), where a killed
    attempt's entries (a gather's, the failure mark a stopped rank leaves) would meet the new attempt's rounds of
    the same numbers: another attempt's RNG states or BN statistics in a checkpoint, or a rank said to have failed.
    Not TORCHELASTIC_RESTART_COUNT: each node's agent counts its own restarts (one whose workers were healthy does
    not count the restart another node caused), and ranks of two counts would wait for each other's keys."""
    return f"arat/{_group_token}"


def agree_on_group_token(info: DistInfo) -> None:
    """Rank 0 draws the group's store prefix and broadcasts it (a backend collective: only this group's ranks take
    part, whatever the store holds of an earlier attempt's)."""
    global _group_token
    device = torch.device("cuda", info.gpu) if dist.get_backend() == "nccl" else torch.device("cpu")
    token = torch.tensor([secrets.randbits(62) if dist.get_rank() == 0 else 0], dtype=torch.int64, device=device)
    dist.broadcast(token, src=0)
    _group_token = f"{int(token.item()):x}"


_rounds = 0  # store exchanges this process has made; ranks make the same ones, so their counts agree. Never reset:
# a process group made again in this process may see the same store, and its keys must not meet the old ones
_last_gather: int | None = None  # the round of this process's last gather (its entries are deleted one round late)


def _gather_key(n: int, rank: int) -> str:
    return f"{store_prefix()}/gather/{n}/{rank}"


POLL_S = 10.0  # how often a rank waiting for the others' store entries looks whether one of them left on an error


def _failed_key(n: int) -> str:
    return f"{store_prefix()}/failed/{n}"


def wait_for_entries(store, keys: list[str], n: int, total: timedelta) -> None:
    """Wait up to `total` for `keys` of round `n`, looking every POLL_S seconds whether a rank left on an error
    before writing its entry (leave_after_an_error marks the round it did not reach): then this rank stops at once
    with one line, where it waited the whole time (the group's timeout, hours for an evaluation's chunks) unless
    torchrun stopped it, which it does only on the failed rank's own node."""
    deadline = time.monotonic() + total.total_seconds()
    while True:
        step = max(min(POLL_S, deadline - time.monotonic()), 0.001)
        started = time.monotonic()
        try:
            store.wait(keys, timedelta(seconds=step))
            return
        except RuntimeError:  # the store's timeout (DistStoreError, a RuntimeError), or the store itself failing
            if store.check([_failed_key(n)]):  # (a store that failed raises here)
                rank = store.get(_failed_key(n)).decode()
                raise UserError(
                    f"rank {rank} stopped on an error (its own output says which); this rank stops too"
                ) from None
            if time.monotonic() >= deadline or time.monotonic() - started < step / 2:  # not a poll that timed out
                raise


def _next_round() -> int:
    global _rounds
    _rounds += 1
    return _rounds


def gather_objects(obj, info: DistInfo, wait: timedelta | None = None) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank, exchanged through the process group's store (pickled),
    each rank reading every rank's entry of this round; a rank that never writes its entry makes the others wait
    the group's timeout, as a collective would.

    Not a backend collective, on purpose: gloo runs collectives on worker threads, and the worker that drops the last
    reference to a collective's Python-created tensors must take the GIL to do so. A gather just before the process
    exits (every evaluation ends with one) left that worker waiting for the GIL as the interpreter finalized, and
    the process aborted after its results were written ("terminate called without an active exception", SIGABRT,
    ~1 exit in 6 with two ranks on two cores). Store reads and writes run on the calling thread.

    `wait`: how long to wait for the other ranks' entries when that may take longer than the group's timeout (an
    evaluation's ranks finish their chunks hours apart on a CPU); never less than the group's timeout."""
    if not info.enabled:
        return [obj]
    store = dist.distributed_c10d._get_default_store()
    payload = pickle.dumps(obj)
    n = _rounds + 1
    store.set(_gather_key(n, info.rank), payload)
    _next_round()  # only now: a rank failing before its entry is written marks this round (leave_after_an_error)
    keys = [_gather_key(n, r) for r in range(info.world_size)]
    wait_for_entries(store, keys, n, store.timeout if wait is None else max(wait, store.timeout))
    out = [pickle.loads(store.get(key)) for key in keys]
    global _last_gather
    if _last_gather is not None:  # every rank wrote round n after reading all of that one: no one reads it again
        store.delete_key(_gather_key(_last_gather, info.rank))
    _last_gather = n
    return out


def apart_from_rank0(value, info: DistInfo, key=None) -> tuple[int, list] | None:
    """(the first rank whose `value` differs from rank 0's, by `key(value)` if given, and every rank's value), or
    None where all agree: gathered, so every rank takes the same decision (a refusal raised on every rank alike)."""
    values = gather_objects(value, info)
    keys = [v if key is None else key(v) for v in values]
    other = next((r for r, k in enumerate(keys) if k != keys[0]), None)
    return None if other is None else (other, values)


def check_same_data(data: dict[str, str] | UserError, source: str, info: DistInfo) -> None:
    """Refuse, on every rank alike, ranks that read other data or none: each rank loads its node's copy of the
    dataset (another copy on another node, a relative data folder seen from another working directory, or the
    synthetic stand-in where a node lacks the data), and training or evaluating on a mix would go on without a
    word; a node that cannot load it would leave the others waiting in their first collective for the group's
    timeout. `data`: {what: this rank's fingerprint of it}, e.g. the training and test splits', or the error its
    loading raised; `source`: where they come from (engine.data.data_source). One process: its own error only."""
    if not info.enabled:
        if isinstance(data, UserError):
            raise data
        return
    mine = str(data) if isinstance(data, UserError) else data
    gathered = gather_objects((socket.gethostname(), source, mine), info)
    for rank, (host, _, theirs) in enumerate(gathered):
        if isinstance(theirs, str):
            raise UserError(f"rank {rank} ({host}): {theirs}")
    host0, source0, first = gathered[0]
    for rank, (host, where, theirs) in enumerate(gathered):
        for what, fingerprint in theirs.items():
            if fingerprint != first.get(what):
                place = f"rank {rank} ({host}" + (", the same host)" if host == host0 else ")")
                sources = f"{where} against {source0}; " if where != source0 else ""
                raise UserError(
                    f"{place} reads other {what} than rank 0 ({host0}): {sources}fingerprint {fingerprint} against "
                    f"{first.get(what)}; give every node the same copy of the dataset (--data-dir, an absolute path)"
                )


def average_bn_statistics(module: nn.Module, info: DistInfo, sum_counts: bool = True) -> None:
    """Every BN's running mean and variance averaged over the ranks. With `sum_counts` their batch counts are
    summed: statistics each rank accumulated as a cumulative average over its equal share of the batches become the
    average over all of them (SWA's re-estimation: one pass over the whole training set, not rank 0's share).
    Without, each keeps its count (moving averages over the same number of steps on every rank)."""
    if not info.enabled:
        return
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                for t in (m.running_mean, m.running_var):
                    dist.all_reduce(t)
                    t.div_(info.world_size)
                if sum_counts:
                    dist.all_reduce(m.num_batches_tracked)


def group_info() -> DistInfo:
    """This process's rank and world size in the running process group (one process outside one), for code that
    is not handed a DistInfo (a method's own collectives)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size())


def broadcast_state(module: nn.Module, info: DistInfo) -> None:
    """Every rank takes rank 0's parameters and buffers (e.g. its BN statistics, which DDP keeps per rank)."""
    if not info.enabled:
        return
    with torch.no_grad():
        for t in module.state_dict().values():
            dist.broadcast(t, src=0)


def shutdown(info: DistInfo, wait: bool = True) -> None:
    """Leave the process group. Rank 0 first waits until every rank has said it is done with the store: where rank
    0's process hosts the store (`env://` or `tcp://` outside torchrun), the others may still be reading the last
    gather when rank 0 is through it. `wait=False` on the way out of an error: the other ranks may never get here,
    and a rank waiting for them would hide the failure from torchrun for the whole timeout."""
    tag_engine_warnings(None)  # this process's later warnings are no rank's (a second group tags them again)
    if not (info.enabled and dist.is_initialized()):
        return
    if not wait:
        leave_after_an_error(info.rank)
        return
    global _last_gather
    store = dist.distributed_c10d._get_default_store()
    n = _next_round()
    store.set(f"{store_prefix()}/done/{n}/{info.rank}", b"1")
    if info.is_main:  # then no rank reads the store again: rank 0 clears what is left of this engine's keys
        done = [f"{store_prefix()}/done/{n}/{r}" for r in range(info.world_size)]
        wait_for_entries(store, done, n, store.timeout)
        last = [] if _last_gather is None else [_gather_key(_last_gather, r) for r in range(info.world_size)]
        for key in done + last:
            store.delete_key(key)
    _last_gather = None
    dist.destroy_process_group()
