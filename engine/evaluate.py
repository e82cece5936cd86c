"""Evaluation (METHOD 7): clean, PGD-20 and AutoAttack (original code, `pyautoattack`), adv BNs, eval mode.

Chunked, seeded, resumable, sharded: the test images (official order) are cut into fixed chunks of
`eval.chunk_size`. Each chunk of each attack runs with its own seed, derived from the base seed, the attack and the
chunk index, so an image's outcome is the same whether one process or N ran the evaluation, in any order. Under
torchrun the chunks go round-robin to the ranks and every rank ends with all per-image flags. With a record
directory each finished chunk is saved as it completes; a rerun with the same model and attack configuration skips
the chunks already there and ends with identical flags.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import time
import traceback
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import autoattack
from .attacks import is_compiled, mode, pgd
from .attacks.graphs import active as active_graphs
from .attacks.graphs import using as graphs_in_use
from .compile_cache import cpu_key
from .config import EPS_8, STEP_2, AttackConfig, EvalConfig, PerfConfig
from .data import ArraySplit, to_unit_interval
from .distributed import DistInfo, gather_objects
from .errors import CompiledEvaluationFailed, UserError, innermost
from .models.gemm_conv import GemmConv2d
from .perf import EvalForward, attack_graphs, compile_wanted, eval_network
from .progress import progress_bar
from .rundir import atomic_json, by_protocol, read_json_or_none, record_key

PGD20 = AttackConfig(eps=EPS_8, step_size=STEP_2, num_steps=20, start="uniform")
CPU_CHUNK = 500
CHUNK_CHOICES = (1000, 500, 250, 100, 50)  # on CUDA, the largest whose attack fits (see chunk_for_memory)
NAMES = {"clean": "clean", "pgd20": "PGD-20", "aa": "AutoAttack"}


def test_tensors(split: ArraySplit, num_examples: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `num_examples` test images in official order, (N, 3, 32, 32) float in [0, 1]."""
    n = min(num_examples, len(split))
    x = to_unit_interval(torch.from_numpy(np.ascontiguousarray(split.images[:n])).to(device)).permute(0, 3, 1, 2)
    return x.contiguous(), torch.from_numpy(split.labels[:n]).to(device)


def padded(size: int, *batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A short batch (tensors sharing their first dimension) filled up to `size` with copies of its first images:
    every shape stays static (one compiled graph). Evaluation runs in eval mode, so the filler changes no other
    image's logits or gradient."""
    n = len(batch[0])
    if n >= size:
        return batch
    fill = torch.arange(size - n, device=batch[0].device) % n
    return tuple(torch.cat([t, t[fill]]) for t in batch)


class SubsetBatch(nn.Module):
    """A compiled `net` called on AutoAttack's shrinking sets of still-robust images (in pieces of at most `size`):
    the batch dimension is marked dynamic, so one graph per grad mode serves every subset size (two on a CPU, whose
    convolution backend, and with it the graph, changes below a batch of 16), and no subset is padded to the chunk.
    (Padding to the chunk, the static-shape alternative, would run APGD-T, FAB-T and Square, which attack only the
    images still robust, about half of a chunk, on about twice the images.) A single image is padded to two: dynamo
    specializes a dimension of size 1, which would be one more graph."""

    def __init__(self, net: nn.Module, size: int):
        super().__init__()
        self.net, self.size = net, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = []
        for i in range(0, len(x), self.size):
            xb = x[i : i + self.size]
            (xp,) = padded(2, xb)
            torch._dynamo.maybe_mark_dynamic(xp, 0)  # no error where a network specializes it anyway
            outputs.append(self.net(xp)[: len(xb)])
        return torch.cat(outputs)


def chunk_seed(seed: int, attack: str, index: int) -> int:
    """The seed of chunk `index` of `attack`: a hash of (base seed, attack, index), in [0, 2^31)."""
    digest = hashlib.sha256(f"{seed}:{attack}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def fingerprint(model: nn.Module) -> str:
    """A hash of the network's weights and buffers: chunk records of another model are never reused."""
    digest = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def pack(flags: torch.Tensor) -> str:
    """Per-image bools as hex, bit i = image i (most significant bit first)."""
    return np.packbits(flags.cpu().numpy().astype(np.uint8)).tobytes().hex()


def unpack(bits: str, n: int) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(np.frombuffer(bytes.fromhex(bits), dtype=np.uint8))[:n].astype(bool))


class ChunkStore:
    """Finished chunks of one attack configuration on one model, one JSON file each (atomic writes)."""

    def __init__(self, root: str | Path | None, attack: str, spec: dict):
        self.spec = spec
        key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
        self.path = Path(root) / "chunks" / f"{attack}-{key}" if root is not None else None
        if self.path is not None:
            self.path.mkdir(parents=True, exist_ok=True)
            if not (self.path / "spec.json").exists():
                atomic_json(self.path / "spec.json", spec, indent=None)

    def load(self, index: int, start: int, stop: int, seed: int, stages: tuple[str, ...] = ()) -> dict | None:
        """Chunk `index` (images start..stop, drawn from `seed`; AutoAttack's: with a count per stage), or None to
        attack it (again): absent, unreadable, or not a whole record of that chunk (hand-edited or damaged: a short
        flags string read as a silently lower accuracy)."""
        if self.path is None or not (self.path / f"{index:05d}.json").exists():
            return None
        try:
            record = json.loads((self.path / f"{index:05d}.json").read_text())
        except (OSError, ValueError):  # a chunk written by a process killed mid-write is redone
            return None
        return record if whole_record(record, index, start, stop, seed, stages) else None

    def save(self, index: int, record: dict) -> None:
        if self.path is not None:
            atomic_json(self.path / f"{index:05d}.json", record, indent=None)


class EvaluationOutOfMemory(UserError):
    """A chunk's attack ran out of memory: the finished chunks are saved; smaller chunks (or forwards) fit."""

    def __init__(self, attack: str, chunk_size: int, batch: int, error: BaseException):
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        half = max(chunk_size // 2, 1)
        super().__init__(f"out of memory attacking {attack} in chunks of {chunk_size} images, {batch} per forward "
                         f"({first}); smaller chunks fit: `arat eval ... --attacks {attack} --chunk-size {half}`, or "
                         f"for a run's closing evaluation `arat train --resume RUN --set eval.chunk_size={half}` (the "
                         "chunk size keys the saved chunks and seeds each: a new size starts over)")  # fmt: skip


def whole_record(record, index: int, start: int, stop: int, seed: int, stages: tuple[str, ...]) -> bool:
    """Whether `record` is a finished record of this chunk, every field in place and the flags long enough."""
    try:
        counts = record["counts"]
        return (record["index"] == index and (record["start"], record["stop"]) == (start, stop)
                and record["seed"] == seed and len(bytes.fromhex(record["flags"])) * 8 >= stop - start
                and isinstance(record["seconds"], (int, float))
                and all(isinstance(counts[s], int) for s in stages))  # fmt: skip
    except (KeyError, TypeError, ValueError, IndexError):
        return False


@torch.no_grad()
def _clean_flags(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
    flags = []
    for i in range(0, len(y), batch_size):
        yb = y[i : i + batch_size]
        (xp,) = padded(batch_size, x[i : i + batch_size])
        flags.append(model(xp)[: len(yb)].argmax(1) == yb)
    return torch.cat(flags)


def _pgd_flags(classifier, attacker, x, y, batch_size: int, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    flags = []
    for i in range(0, len(y), batch_size):
        yb = y[i : i + batch_size]
        xp, yp = padded(batch_size, x[i : i + batch_size], yb)
        x_adv = pgd(attacker, xp, yp, PGD20, bn="adv", train=False)
        with torch.no_grad():
            flags.append(classifier(x_adv)[: len(yb)].argmax(1) == yb)
    return torch.cat(flags)


MEMORY_SHARE, MEMORY_MARGIN = 0.5, 3.0  # chunk_for_memory's rule


def chunk_for_memory(
    bytes_per_image: float, total_bytes: int, share: float = MEMORY_SHARE, margin: float = MEMORY_MARGIN
) -> int:
    """The largest of CHUNK_CHOICES whose attack needs at most `share` of the device's memory, counting `margin`
    times an input-gradient pass's peak per image (AutoAttack keeps a few more image-sized buffers, and the
    allocator rounds up). Depends on the network and the device's total memory only, not on what is free now."""
    for size in CHUNK_CHOICES:
        if margin * bytes_per_image * size <= share * total_bytes:
            return size
    return CHUNK_CHOICES[-1]


def attack_bytes_per_image(model: nn.Module, image_shape: tuple[int, ...], device: torch.device, probe: int = 32):
    """Peak CUDA memory per image of one forward + input-gradient pass of the evaluation classifier (resets the
    device's peak-memory statistics)."""
    x = torch.full((probe, *image_shape), 0.5, device=device, requires_grad=True)  # draws no random numbers
    with mode(model, train=False), torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
        torch.autograd.grad(EvalForward(model)(x).sum(), x)  # cuDNN's default algorithms: a repeatable workspace
        # measured on a second pass: the first creates cuBLAS's lasting workspace, which a fresh `arat eval` process
        # would count and the training process (where it exists already) would not, changing the chunk size
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        torch.autograd.grad(EvalForward(model)(x).sum(), x)
    return (torch.cuda.max_memory_allocated(device) - base) / probe


def cpu_bytes_per_image(model: nn.Module, image_shape: tuple[int, ...]) -> float:
    """Bytes per image that an input-gradient pass of the evaluation classifier keeps on a CPU (which counts no
    peak memory), estimated as the outputs of its modules without submodules (about what autograd saves), from one
    image's forward (nothing drawn at random)."""
    total = 0

    def count(_module, _inputs, out):
        nonlocal total
        total += out.numel() * out.element_size() if isinstance(out, torch.Tensor) else 0

    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        with mode(model, train=False), torch.no_grad():
            EvalForward(model)(torch.full((1, *image_shape), 0.5))
    finally:
        for handle in handles:
            handle.remove()
    return float(total)


def physical_memory() -> int | None:
    """This machine's memory in bytes, or this process's cgroup limit below it (a container's, SLURM's --mem);
    None unknown."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
    for limit in cgroup_memory_files():
        with contextlib.suppress(OSError, ValueError):  # ("max": no limit; v1's "none" is a huge number)
            total = min(total, int(limit.read_text().strip()))
    return total


def cgroup_memory_files(root: Path = Path("/sys/fs/cgroup"), own: Path = Path("/proc/self/cgroup")) -> list[Path]:
    """The memory-limit files of this process's cgroup, v2 (`memory.max`) and v1 (`memory.limit_in_bytes`), at the
    path /proc/self/cgroup names (a nested group: SLURM's job) and at the mount's root (a container's namespace)."""
    files = [root / "memory.max", root / "memory" / "memory.limit_in_bytes"]
    with contextlib.suppress(OSError):
        for line in own.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            relative = path.lstrip("/")
            if controllers == "":  # v2's unified hierarchy
                files.append(root / relative / "memory.max")
            elif "memory" in controllers.split(","):
                files.append(root / "memory" / relative / "memory.limit_in_bytes")
    return files


def resolve_chunk_size(cfg: EvalConfig, model: nn.Module, image_shape, device: torch.device) -> tuple[int, str]:
    """(chunk size, why): eval.chunk_size when set; else on a CPU 500, or less where `chunk_for_memory`'s rule on
    the machine's memory says so (WRN-34-10 keeps ~5x ResNet-18's per image: 500 of them ran a 16-32 GB machine out
    of memory), and on CUDA by `chunk_for_memory`."""
    if cfg.chunk_size:
        return cfg.chunk_size, "set"
    if device.type != "cuda":
        total = physical_memory()
        per_image = cpu_bytes_per_image(model, tuple(image_shape)) if total else 0.0
        size = min(CPU_CHUNK, chunk_for_memory(per_image, total)) if total else CPU_CHUNK
        if size == CPU_CHUNK:
            return CPU_CHUNK, "auto: CPU"
        return size, f"auto: CPU, ~{per_image / 2**20:.0f} MiB per image (estimated), {total / 2**30:.0f} GiB memory"
    per_image = attack_bytes_per_image(model, tuple(image_shape), device)
    total = torch.cuda.get_device_properties(device).total_memory
    size = chunk_for_memory(per_image, total)
    why = f"auto: {per_image / 2**20:.1f} MiB per image (input-gradient pass), {total / 2**30:.0f} GiB device"
    if MEMORY_MARGIN * per_image * size > MEMORY_SHARE * total:  # the rule, which its smallest choice breaks here
        why += f"; {size} is the smallest chunk, above the rule's half of the memory: lower eval.chunk_size if it fails"
    return size, why


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def rank_balance(num_examples: int, chunk_size: int, world_size: int) -> float:
    """The best share of the ranks' time spent attacking when `world_size` ranks take the chunks round-robin: the
    ranks with fewer images wait for the busiest (time per image assumed equal; the last chunk holds the rest)."""
    sizes = [min(chunk_size, num_examples - start) for start in range(0, num_examples, chunk_size)]
    busiest = max(sum(sizes[rank::world_size]) for rank in range(world_size)) if sizes else 0
    return num_examples / (world_size * busiest) if busiest else 1.0


def balance_note(num_examples: int, chunk_size: int, world_size: int, floor: float = 0.9) -> str | None:
    """One line when the chunks cannot keep the ranks busy (balance under `floor`), naming a chunk size that does;
    None when they can. The chunk size is left as it is: it fixes each image's seed, so evaluations with different
    chunk sizes do not give the same flags image by image."""
    balance = rank_balance(num_examples, chunk_size, world_size)
    if world_size < 2 or balance >= floor:
        return None
    chunks, tail = _ceil_div(num_examples, chunk_size), num_examples % chunk_size
    sized = f"{min(chunk_size, num_examples)} images" + (f" (the last {tail})" if chunks > 1 and tail else "")
    note = (f"eval: {chunks} chunk{'s' * (chunks != 1)} of {sized} over {world_size} ranks keep them busy "
            f"{100 * balance:.0f}% of the time at best")  # fmt: skip
    for c in (c for c in CHUNK_CHOICES if c < chunk_size):
        share = rank_balance(num_examples, c, world_size)
        if share >= floor:
            return note + f"; chunks of {c} (--chunk-size / eval.chunk_size) would keep them {100 * share:.0f}% busy"
    return note


def data_fingerprint(x: torch.Tensor, y: torch.Tensor) -> str:
    """A hash of the test images and labels an attack runs on: chunks made on other data (another --data-dir, the
    synthetic fallback of as many images) are never reused."""
    digest = hashlib.sha256()
    for t in (x, y):
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


# What the engine's attacks compute, as a version in every chunk's key: raised with any change that can change a
# chunk's flags (an attack's code, the evaluation's dtype or forward), so a chunk an older engine saved is redone,
# not served under the new code's name. 2: evaluation in fp32 also under a caller's autocast (2026-12-06).
EVAL_VERSION = 2


def attack_spec(
    name: str, cfg: EvalConfig, n: int, seed: int, model_hash: str, batch_size: int, tf32: bool = False,
    channels_last: bool = True, compiled: bool | str = False, data_hash: str | None = None, hardware: str | None = None,
    gemm_convs: list[str] | None = None,
) -> dict:  # fmt: skip
    """What determines an attack's per-image flags (and so whether saved chunks can be reused). `tf32`: CUDA
    convolutions may run in TF32 (torch's default for cuDNN, which AutoAttack and RobustBench evaluations keep).
    The network's memory format picks other convolution kernels, whose last bits may differ, as does torch.compile
    (`compiled`: its backend, e.g. Inductor's fused code); cuDNN picks its algorithms by heuristic, deterministic
    ones only (`repeatable_kernels`). `hardware` (`hardware_id`): kernels differ in their last bits between GPU models,
    cuDNN/CUDA versions, CPU instruction sets and torch versions, so chunks are reused only where they ran.
    `gemm_convs`: the convolutions a CPU run computes as matrix products (perf.gemm_conv: the evaluation ending a
    training run inherits them, `arat eval` does not), whose last bits differ from oneDNN's."""
    spec = {"engine_evaluation": EVAL_VERSION, "attack": name, "num_examples": n, "chunk_size": cfg.chunk_size,
            "seed": seed, "model": model_hash,
            "batch_size": batch_size, "dtype": "fp32", "tf32_convolutions": tf32,
            "memory_format": "channels_last" if channels_last else "contiguous", "compiled": compiled,
            "cudnn_algorithms": "heuristic, deterministic", "inductor": inductor_mode(),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),  # perf.deterministic's
            "seeds": "sha256(seed:attack:chunk) per chunk", "data": data_hash, "hardware": hardware,
            "gemm_convolutions": gemm_convs or []}  # fmt: skip
    if name == "pgd20":
        spec |= {"steps": PGD20.num_steps, "step_size": "2/255", "eps": "8/255", "start": PGD20.start}
    if name == "aa":
        spec |= {"protocol": autoattack.PROTOCOLS[cfg.aa_version].describe()}
    return spec


def inductor_mode() -> str:
    """Whether Inductor compiles in its deterministic mode now (inside `repeatable_kernels`, where torch has it)."""
    import torch._inductor.config as inductor

    return "deterministic" if getattr(inductor, "deterministic", False) else "default"


def hardware_id(device: torch.device) -> str:
    """What picks the evaluation's kernels besides its settings: the GPU model with cuDNN's and CUDA's versions, or
    the CPU's instruction set (torch's capability and a hash of its flags) and torch's threads (a reduction split
    over other threads may sum in another order: torchrun gives each rank one), and torch's version."""
    if device.type == "cuda":
        return (f"{torch.cuda.get_device_name(device)}; cuDNN {torch.backends.cudnn.version()}; "
                f"CUDA {torch.version.cuda}; torch {torch.__version__}")  # fmt: skip
    return f"{device.type} {cpu_key()}; {torch.get_num_threads()} threads; torch {torch.__version__}"


@contextlib.contextmanager
def repeatable_kernels() -> Iterator[None]:
    """cuDNN's algorithms chosen by its heuristic, not by timing them (training's cudnn.benchmark would let each
    process time its own and pick differently for one shape, and it times again for every new batch size of
    AutoAttack's shrinking subsets), and deterministic ones only; Inductor in its deterministic mode while the
    evaluation's roles compile and first run (it would time candidate reduction configs in each process): an
    image's flags must not depend on the process or the run that attacked it. The previous settings come back."""
    import torch._inductor.config as inductor

    cudnn = torch.backends.cudnn
    saved = cudnn.benchmark, cudnn.deterministic
    cudnn.benchmark, cudnn.deterministic = False, True
    pinned = inductor.patch(deterministic=True) if hasattr(inductor, "deterministic") else contextlib.nullcontext()
    try:
        with pinned:
            yield
    finally:
        cudnn.benchmark, cudnn.deterministic = saved


def evaluate(
    model: nn.Module,
    split: ArraySplit,
    cfg: EvalConfig,
    device: torch.device,
    seed: int = 0,
    perf_cfg: PerfConfig | None = None,
    dist: DistInfo | None = None,
    record_dir: str | Path | None = None,
) -> dict:
    """`_evaluate`; a failure of torch.compile there (never run on a GPU yet) becomes one line naming the eager rerun,
    its traceback kept in `record_dir`/compile_error.txt, instead of a traceback at the end of a training run."""
    perf_cfg = perf_cfg or PerfConfig(compile="off")
    try:  # fp32, as its records say, also when called under a caller's autocast (which would run it in bf16)
        with torch.autocast(device.type, enabled=False):
            return _evaluate(model, split, cfg, device, seed, perf_cfg, dist, record_dir)
    except torch._dynamo.exc.TorchDynamoException as e:
        if not compile_wanted(perf_cfg, device):
            raise
        where = ""
        if record_dir is not None:
            path = Path(record_dir) / "compile_error.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(traceback.format_exception(e)))
            where = f"; traceback in {path}"
        cause = innermost(e)  # dynamo wraps the backend's error: name the innermost
        if isinstance(cause, (OSError, MemoryError, torch.OutOfMemoryError)):  # said as such, not "compile off"
            raise cause from None  # (the whole traceback is in compile_error.txt; `from e` made a cycle)
        first = (str(cause).strip().splitlines() or [""])[0][:200]
        raise CompiledEvaluationFailed(
            f"the compiled evaluation failed ({type(cause).__name__}: {first}{where})"
        ) from e


def _evaluate(
    model: nn.Module,
    split: ArraySplit,
    cfg: EvalConfig,
    device: torch.device,
    seed: int,
    perf_cfg: PerfConfig,
    dist: DistInfo | None,
    record_dir: str | Path | None,
) -> dict:
    """{attack: {"accuracy", "num_examples", "seconds", "images_per_s", ..., "flags"}} for each attack of
    `cfg.attacks`, the same on every rank. The classifier runs compiled when `perf_cfg.compile` resolves on (clean
    and PGD-20 with static shapes, short batches padded; AutoAttack's subsets with a dynamic batch dimension, see
    SubsetBatch); `record_dir` keeps finished chunks for a rerun. The model is left in perf.channels_last's memory
    format (training's; a trained model is in it already) and in the train/eval mode it came in. The roles compile
    in Inductor's default mode whatever training's perf.compile_mode: max-autotune picks kernels by timing them in
    each process (an image's flags would depend on the rank that attacked it), and reduce-overhead would record a
    CUDA graph per AutoAttack subset size (the engine's own graphs capture PGD-20)."""
    dist = dist or DistInfo()
    perf_cfg = dataclasses.replace(perf_cfg, compile_mode="default")
    n_all = max(cfg.num_examples, cfg.aa_num_examples)
    x_all, y_all = test_tensors(split, n_all, device)
    # the training layout (a trained model is in it already); an attack's input-gradient pass of a CPU ResNet-18 ran
    # 1.35x faster channels-last than contiguous. The inputs stay contiguous: AutoAttack reshapes them with .view
    model.to(memory_format=torch.channels_last if perf_cfg.channels_last else torch.contiguous_format)
    classifier, attacker = (eval_network(model, perf_cfg, device, attack) for attack in (False, True))
    # every rank takes rank 0's chunk size (its memory measure could differ): the chunks must tile the same images
    chunk_size, chunk_reason = gather_objects(resolve_chunk_size(cfg, model, x_all.shape[1:], device), dist)[0]
    cfg = dataclasses.replace(cfg, chunk_size=chunk_size)
    longest = "aa" if "aa" in cfg.attacks else "clean"  # AutoAttack's by far; the others run on the same images
    note = balance_note(num_images(longest, cfg, len(y_all)), chunk_size, dist.world_size)
    if note and dist.is_main:
        print(note, file=sys.stderr, flush=True)
    batch = min(cfg.batch_size, chunk_size, len(y_all))  # fewer images than a chunk: no padding up to it
    compiled = is_compiled(attacker)
    aa_compiled = compiled and "aa" in cfg.attacks  # AutoAttack's own role: PGD-20's static graphs stay apart
    aa_net = (
        SubsetBatch(eval_network(model, perf_cfg, device, "autoattack"), batch) if aa_compiled else EvalForward(model)
    )
    protocol = autoattack.PROTOCOLS[cfg.aa_version]
    model_hash = fingerprint(model)
    gemm_convs = sorted(name for name, m in model.named_modules() if isinstance(m, GemmConv2d))
    tf32 = device.type == "cuda" and torch.backends.cudnn.allow_tf32
    hardware = hardware_id(device)
    results, data_hashes = {}, {}
    graphs = attack_graphs(perf_cfg, device, reuse=active_graphs())  # PGD-20 captured on CUDA, in training's pool
    with mode(model, train=False), graphs_in_use(graphs), repeatable_kernels():
        for name in cfg.attacks:
            n = num_images(name, cfg, len(y_all))
            if n not in data_hashes:  # clean and PGD-20 run on the same images: hashed (on the host) once
                data_hashes[n] = data_fingerprint(x_all[:n], y_all[:n])
            spec = attack_spec(name, cfg, n, seed, model_hash, batch, tf32, perf_cfg.channels_last,
                               compiled and perf_cfg.compile_backend, data_hashes[n], hardware, gemm_convs)  # fmt: skip
            store = ChunkStore(record_dir, name, spec)
            starts = range(0, n, cfg.chunk_size)
            mine = [k for k in range(len(starts)) if k % dist.world_size == dist.rank]
            start, records, reused = time.perf_counter(), [], 0
            bar = progress_bar(mine, desc=f"eval: {name}", leave=False, dynamic_ncols=True, disable=not dist.is_main)
            stages = ("clean", *protocol.attacks) if name == "aa" else ()
            for k in bar:
                lo, hi = starts[k], min(starts[k] + cfg.chunk_size, n)
                record = store.load(k, lo, hi, chunk_seed(seed, name, k), stages)
                if record is None:
                    chunk = (k, lo, x_all[lo:hi], y_all[lo:hi], chunk_seed(seed, name, k))
                    try:
                        nets = (classifier, attacker, aa_net)
                        record = _attack_chunk(name, chunk, nets, batch, protocol, bar, model_hash)
                    except (torch.OutOfMemoryError, MemoryError) as e:
                        raise EvaluationOutOfMemory(name, cfg.chunk_size, batch, e) from None
                    store.save(k, record)
                else:
                    reused += 1
                records.append(record)
            config = store.spec | {"chunk_size_rule": chunk_reason}
            results[name] = _attack_result(name, records, n, cfg, protocol, config, reused, start, dist)
            if name == "pgd20" and graphs is not None:  # AutoAttack's chunks were sized without PGD-20's graphs
                graphs.release()
    return results


def _attack_chunk(name: str, chunk: tuple, nets: tuple, batch: int, protocol, bar, network: str) -> dict:
    """One chunk's record: (index, first image, images, labels, seed) in; its packed per-image flags, AutoAttack's
    stage counts and its seconds out. `network`: the weights' fingerprint (AutoAttack's warnings, once each)."""
    k, lo, x, y, seed = chunk
    classifier, attacker, aa_net = nets
    start, counts, stage_seconds = time.perf_counter(), None, None
    if name == "clean":
        flags = _clean_flags(classifier, x, y, batch)
    elif name == "pgd20":
        flags = _pgd_flags(classifier, attacker, x, y, batch, seed)
    else:
        bar.set_postfix_str("")  # not the last chunk's stages
        stage_seconds = {}
        flags, counts = autoattack.attack_chunk(aa_net, x, y, protocol, seed, batch, _postfix(bar, protocol.attacks),
                                                stage_seconds, network)  # fmt: skip
    return {"index": k, "start": lo, "stop": lo + len(y), "seed": seed, "flags": pack(flags), "counts": counts,
            "seconds": round(time.perf_counter() - start, 3), "stage_seconds": stage_seconds or None}  # fmt: skip


def _attack_result(name: str, records: list[dict], n: int, cfg: EvalConfig, protocol, config: dict, reused: int,
                   start: float, dist: DistInfo) -> dict:  # fmt: skip
    """An attack's result from every rank's chunk records (gathered here: the same on every rank)."""
    # a rank's last chunk may end hours after another's (a CPU's AutoAttack at full width: ~6 h per 500 images),
    # past the group's timeout: the ranks that are done wait for it, as long as four whole chunks would take at
    # their own pace (round-robin: another rank has at most one more); a rank with no chunk of its own, a week
    per_image = max((r["seconds"] / max(r["stop"] - r["start"], 1) for r in records), default=None)
    wait = timedelta(days=7) if per_image is None else timedelta(seconds=4 * per_image * cfg.chunk_size + 600)
    gathered = gather_objects(records, dist, wait=wait)
    records = sorted((r for part in gathered for r in part), key=lambda r: r["index"])
    tiling = [(lo, min(lo + cfg.chunk_size, n)) for lo in range(0, n, cfg.chunk_size)]
    if [(r["start"], r["stop"]) for r in records] != tiling:
        raise RuntimeError(f"{name}: the chunks gathered from the ranks do not tile the {n} test images")
    flags = torch.cat([unpack(r["flags"], r["stop"] - r["start"]) for r in records])
    seconds = time.perf_counter() - start
    reused = sum(gather_objects(reused, dist))  # on any rank: then the wall time is not all the work's
    result = {
        "accuracy": int(flags.sum()) / n,
        "num_examples": n,
        "seconds": round(seconds, 2),
        "images_per_s": round(n / seconds, 2) if seconds > 0 and not reused else None,
        "chunk_seconds": round(sum(r["seconds"] for r in records), 2),
        "chunks": len(records),
        "reused_chunks": reused,
        "config": config,
        "flags": pack(flags),
    }
    if name == "aa":
        stages = {s: sum(r["counts"][s] for r in records) / n for s in ("clean", *protocol.attacks)}
        result |= {"version": cfg.aa_version, "stages": stages, "stage_seconds": _stage_seconds(records, protocol)}
    return result


def _stage_seconds(records: list[dict], protocol) -> dict[str, float] | None:
    """Each AutoAttack stage's seconds summed over the chunks (its cost: Square's queries, FAB-T's targets), or None
    where a chunk saved by an older engine did not record them."""
    if not all(isinstance(r.get("stage_seconds"), dict) for r in records):
        return None
    return {s: round(sum(r["stage_seconds"].get(s, 0.0) for r in records), 2) for s in protocol.attacks}


def num_images(attack: str, cfg: EvalConfig, available: int) -> int:
    """How many of the first test images `attack` runs on (AutoAttack may take fewer: eval.aa_num_examples)."""
    return min((cfg.aa_num_examples or cfg.num_examples) if attack == "aa" else cfg.num_examples, available)


def _postfix(bar, stages: tuple[str, ...]):
    """AutoAttack's progress within a chunk (minutes each on a CPU) on the bar: "after apgd-t 31.6%, now fab-t"."""
    order = ("clean", *stages)

    def show(stage: str, accuracy: float) -> None:  # raising here would end the attack: unknown stages just show
        i = order.index(stage) if stage in order else len(order)
        text = f"{'clean' if i == 0 else 'after ' + stage} {100 * accuracy:.1f}%"
        bar.set_postfix_str(text + (f", now {order[i + 1]}" if i + 1 < len(order) else ""))

    return show


def summary(results: dict) -> dict:
    """The results without the per-image flags (for results.json and eval.json; the flags go to their own file),
    each under its record key (AutoAttack's legacy-10 as "aa-legacy-10")."""
    return {record_key(name, r): {k: v for k, v in r.items() if k != "flags"} for name, r in results.items()}


def write_flags(directory: str | Path, results: dict) -> Path:
    """flags.json: per attack, the per-image robust (or, for clean, correct) flags as hex, bit i = test image i,
    with the network's and the data's hashes and AutoAttack's version. Merged into the file there: an evaluation of
    other attacks (`arat eval RUN --attacks pgd20`) keeps the entries it did not redo (it replaced the file, and so
    lost the run's AutoAttack flags)."""
    path = Path(directory) / "flags.json"
    data = read_json_or_none(path)
    data = by_protocol(data) if isinstance(data, dict) else {}
    for name, r in results.items():
        config = r.get("config", {})
        key = record_key(name, r)  # each AutoAttack protocol's flags apart
        data[key] = {"num_examples": r["num_examples"], "bits": r["flags"], "order": "official test order, MSB first",
                     "model": config.get("model"), "data": config.get("data")}  # fmt: skip
        if name == "aa":
            data[key]["version"] = r.get("version")
    atomic_json(path, data, indent=None)
    return path


def format_results(results: dict) -> str:
    parts = []
    for k, v in results.items():
        label = NAMES[k] + (f" ({v['version']})" if k == "aa" and v.get("version") not in (None, "standard") else "")
        parts.append(f"{label} {100 * v['accuracy']:.2f}% (n={v['num_examples']})")
    return "  ".join(parts)
