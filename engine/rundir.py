"""A run directory: config.json, env.json, metrics.jsonl, checkpoints/{latest,final}.pt, results.json.

Every file is written atomically (temporary file + rename), so an interrupted run never leaves a half file.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from .compile_cache import cpu_name
from .config import TrainConfig
from .errors import UserError, shell_word
from .locks import flock_within

LOCK = ".lock"  # held by the process writing the run (train, or eval writing eval.json)
LATEST, FINAL = "latest.pt", "final.pt"  # checkpoints/: after each epoch; the network the run ended with
WRITE_PROBE = ".write-test"  # written and removed to check a run folder is writable
# what a run writes in its folder (atomically: a kill leaves a temporary `.NAME.XXXXXXXX`, mkstemp's 8 characters)
OWN_FILES = ("config.json", "env.json", "progress.json", "results.json", "eval.json", "metrics.jsonl")
TEMP_NAME = re.compile(r"\.(.+)\.[a-z0-9_]{8}")


class RunDirError(UserError):
    """An output directory that can't be used; the message says what to do."""


class RunDirInUse(RunDirError):
    """Another process holds the run's lock."""


def file_mode() -> int:
    """One permission policy for every file of a run: what the umask gives a new file (mkstemp alone gives 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: Path, write, durable: bool = True) -> None:
    """`write(f)` into a temporary file renamed to `path`: a kill leaves the old file or the new, whole. `durable`:
    synced before the rename, so a host crash does too (not for progress.json: rewritten every log interval, where
    a sync can stall a GPU run on a busy disk)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        with contextlib.suppress(PermissionError, NotImplementedError):  # vfat/exFAT refuse it: their own modes
            os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_json(path: Path, data: dict, indent: int | None = 2, durable: bool = True) -> None:
    """`data` as JSON at `path`, written atomically (indent None: one line, for many small files)."""
    text = json.dumps(data, indent=indent) + ("\n" if indent is not None else "")
    atomic_write(path, lambda f: f.write(text.encode()), durable)


def read_json_or_none(path: Path) -> Any:
    """The JSON at `path`, or None where it is missing, unreadable, cut short or not UTF-8 (a file an earlier
    command may or may not have written whole: the caller starts afresh or leaves it out)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@functools.cache  # once per process (the start line and env.json each asked: git ran four times at a run's start)
def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


@functools.cache
def git_dirty() -> bool | None:
    """Whether the engine's checkout has tracked files changed since its commit (the run did not run that commit's
    code as it is); None outside a git checkout. Asked once per process: its code is the code it imported."""
    try:
        # (--no-optional-locks: no index.lock taken, e.g. under a user's own git command in the checkout)
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"],
                             capture_output=True, text=True, timeout=5, cwd=here)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def version_line() -> str:
    """arat's version and commit (marked where the checkout has uncommitted changes), and the torch / triton it runs
    on (what a bug report needs; the start line of every run)."""
    own = package_version("arat") or "(not installed)"  # run from a checkout without `pip install -e .`
    commit = git_commit()
    changed = ", with uncommitted changes" if commit and git_dirty() else ""
    where = f" (commit {commit[:12]}{changed})" if commit else ""
    return f"arat {own}{where}, torch {torch.__version__}, triton {package_version('triton') or 'none'}"


def environment(device: torch.device) -> dict[str, Any]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = device.type == "cuda"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "device_type": device.type,
        "num_threads": torch.get_num_threads(),
        "cpu": cpu_name() or platform.machine(),
        "pyautoattack": package_version("pyautoattack"),
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "host": platform.node(),
    }


def package_version(package: str) -> str | None:
    """The installed distribution's version, else the importable module's own `__version__` (a copy of its files
    without the package metadata: the GPU check carries pyautoattack so); None: neither."""
    import importlib
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        pass
    try:
        return getattr(importlib.import_module(package), "__version__", None)
    except ImportError:
        return None


def record_key(attack: str, result: Any) -> str:
    """The name an attack's result is kept under in results.json, eval.json and flags.json: AutoAttack under a
    protocol other than `standard` apart from it ("aa-legacy-10"), so that evaluating one protocol never replaces
    the other's figure (a legacy-10 evaluation after a standard one replaced it, and `arat export` then published
    legacy-10's higher reading as RobustBench's autoattack_acc)."""
    version = result.get("version") if attack == "aa" and isinstance(result, dict) else None
    return attack if version in (None, "standard") else f"aa-{version}"


def by_protocol(results: dict) -> dict:
    """`results` keyed by `record_key` (records an older engine wrote kept every protocol under "aa")."""
    return {record_key(attack, result): result for attack, result in results.items()}


def results_on(dataset: str, evaluations: list[tuple[str, dict]]) -> tuple[dict, list[tuple[str, str]]]:
    """The results of `evaluations` ((file name, its JSON) in order: results.json, then eval.json, a later `arat
    eval`, whose attacks override) made on `dataset`, the data the run trained on; and the (file name, dataset) of
    those left out, evaluations on other data. A record without "dataset" (an older engine) counts as `dataset`.
    A later attack of the same network (its weights' hash) on fewer images (a quick `arat eval RUN --num-examples
    100`) does not replace the fuller one. Test images other than the first record's (its "test_data"
    fingerprint: another copy of the dataset, or a relative data folder read from elsewhere) are left out too,
    as "<dataset>, other test images": clean from one copy beside AutoAttack from another read as one model's."""
    results: dict = {}
    left_out = []
    test_data = None  # the first record's that says (results.json's: the training's own test images)
    for name, evaluation in evaluations:
        if evaluation.get("dataset", dataset) != dataset:
            left_out.append((name, evaluation["dataset"]))
            continue
        this = evaluation.get("test_data")
        if this is not None and test_data is not None and this != test_data:
            left_out.append((name, f"{dataset}, other test images"))
            continue
        test_data = test_data or this
        for attack, result in by_protocol(evaluation["results"]).items():
            if not fewer_images_of_the_same_network(result, results.get(attack)):
                results[attack] = result
    return results, left_out


def fewer_images_of_the_same_network(later: Any, earlier: Any) -> bool:
    """Whether `later` covers fewer images than `earlier` of the same network (its weights' hash). A record without
    one (an older engine's) may be of another network (engines before 2026-12-05 left a shorter run's results.json
    when it trained on past its end), so a later figure replaces it whatever its image count."""
    if not isinstance(later, dict) or not isinstance(earlier, dict):
        return False
    model = [r.get("config", {}).get("model") if isinstance(r.get("config"), dict) else None for r in (later, earlier)]
    fewer = isinstance(later.get("num_examples"), int) and later["num_examples"] < earlier.get("num_examples", 0)
    return model[0] is not None and model[0] == model[1] and fewer


def first_fingerprint(env: Any) -> str | None:
    """The training set's fingerprint env.json first recorded: its start's, or, for a run started before the key
    existed, that of the first resume that recorded one (helper-114: such a run was never checked again)."""
    if not isinstance(env, dict):
        return None
    resumes = env.get("resumes") if isinstance(env.get("resumes"), list) else []
    found = [e.get("train_data") for e in [env, *resumes] if isinstance(e, dict)]
    return next((f for f in found if isinstance(f, str)), None)


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"

    @contextlib.contextmanager
    def open_for_writing(self, resume: bool, unwritable: str = "pick a writable --out", wait_s: float = 0.0):
        """Create (or reopen, to resume) the run directory and hold an exclusive lock on it until the block ends:
        a second process writing into the same run gets one line naming the holder (after waiting up to `wait_s`
        for it to let go, named again then: another may hold it by then). On a filesystem that takes no file locks
        the block runs unlocked, said in one line. `unwritable`: what to do when the folder cannot be written."""
        self.create(resume, unwritable)
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, file_mode())
        try:
            if not flock_within(fd, 0.0):
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                if wait_s > 0:  # (a stopped job's replacement started before it has let go: a scheduler's requeue)
                    print(f"arat: {self.path} is in use by {holder}: waiting up to {wait_s:.0f} s for it to let go",
                          file=sys.stderr, flush=True)  # fmt: skip
                if not flock_within(fd, wait_s, poll_s=0.5):
                    raise BlockingIOError
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            stale = f"a holder on another host that is down leaves the lock held: then remove {LOCK}"
            said = f"{self.path} is in use by {holder}: wait for it to end (or stop it), retry ({stale})"
            raise RunDirInUse(said) from None
        except OSError as e:  # ENOLCK, EOPNOTSUPP, ENOSYS: NFS without lockd, Lustre's noflock, some FUSE/SMB mounts
            print(f"arat: cannot lock {self.path / LOCK} ({e.strerror}): this filesystem takes no file locks; going "
                  "on without one: start no second process on this run while it runs", file=sys.stderr)  # fmt: skip
        try:  # started together with another process, which took the lock and wrote its run first
            self.check_new(resume)
        except RunDirError:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {platform.node()}".encode(), 0)
        try:
            yield self
        finally:
            os.close(fd)  # releases the lock

    def holds_anything(self) -> bool:
        """Anything but what an interrupted start leaves (the lock, an empty checkpoints/, the write probe): a run
        killed between making its folder and writing its config starts again there."""
        left_by_a_start = {LOCK, WRITE_PROBE}
        return any(
            p.name not in left_by_a_start and not (p == self.checkpoints and p.is_dir() and not any(p.iterdir()))
            for p in self.path.iterdir()
        )

    def check_new(self, resume: bool) -> None:
        """A new run (not a resume) goes only into a new folder, an empty one, or one an interrupted start left."""
        if self.path.exists() and not resume and self.holds_anything():
            if not (self.path / "config.json").exists():
                raise RunDirError(f"{self.path} is not empty and holds no run: pick another --out (a new or empty "
                                  "directory)")  # fmt: skip
            raise RunDirError(
                f"{self.path} already holds a run: resume it with `arat train --resume {shell_word(self.path)}` "
                "or pick another --out"
            )

    def create(self, resume: bool, unwritable: str = "pick a writable --out") -> None:
        self.check_new(resume)
        try:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            probe = self.path / WRITE_PROBE
            probe.write_text("")
            probe.unlink(missing_ok=True)  # another process starting here at once may have removed it
        except OSError as e:
            raise RunDirError(f"cannot write to {self.path} ({e.strerror}); {unwritable}") from None

    def write_json(self, name: str, data: dict, durable: bool = True) -> None:
        atomic_json(self.path / name, data, durable=durable)

    def read_json(self, name: str) -> dict:
        return json.loads((self.path / name).read_text())

    def training_record(self) -> dict[str, Any]:
        """What the run recorded about its training: "dataset" (the data used: synthetic where the fallback replaced
        absent real data), "world_size" (processes, each with a batch of its own) and "train_data" (the training
        split's fingerprint, since 2026-12-06), from env.json (written at the start since 2026-12-02) or else
        results.json (written at the end); keys left out where nothing says."""
        record: dict[str, Any] = {}
        for name in ("results.json", "env.json"):  # env.json's, written first, wins
            try:
                data = self.read_json(name)
            except (OSError, ValueError):
                continue
            env = data.get("environment") if isinstance(data, dict) and name == "results.json" else data
            found = {
                "dataset": data.get("dataset") if isinstance(data, dict) else None,
                "world_size": env.get("world_size") if isinstance(env, dict) else None,
                "train_data": first_fingerprint(data) if name == "env.json" else None,
            }
            record |= {k: v for k, v in found.items() if v is not None}
        return record

    def record_environment(self, env: dict[str, Any], resume: bool) -> None:
        """env.json: the environment the run started in; each resume appends its own under "resumes"."""
        path = self.path / "env.json"
        if resume and path.exists():
            try:
                first = self.read_json("env.json")
            except ValueError:  # not JSON, or not UTF-8: the first environment is lost, the run is not
                first = None
            if isinstance(first, dict):
                env = first | {"resumes": [*first.get("resumes", []), env]}
        self.write_json("env.json", env)

    def save_config(self, cfg: TrainConfig) -> None:
        self.write_json("config.json", cfg.to_dict())

    def save_checkpoint(self, name: str, state: dict) -> None:
        atomic_write(self.checkpoints / name, lambda f: torch.save(state, f))

    def checkpoint(self, name: str) -> Path:
        return self.checkpoints / name

    def unfinished(self, epochs: int | None) -> str | None:
        """ "after epoch N of M" where the run's figures can only be its latest checkpoint's (no final.pt: it never
        ended, or it is training on past an earlier end); None for a finished run or one without a checkpoint."""
        if self.checkpoint(FINAL).exists() or not self.checkpoint(LATEST).exists():
            return None
        try:  # the checkpoint's own epoch (its tensors mapped, not read): a row is written just before it
            epoch = torch.load(self.checkpoint(LATEST), map_location="cpu", mmap=True, weights_only=True)["epoch"]
        except Exception:  # unreadable here: the metrics' last row
            try:
                epoch = ([row.get("epoch") for row in self.metrics()] or [None])[-1]
            except RunDirError:  # a corrupt metrics.jsonl: said without the epoch
                epoch = None
        of = f" of {epochs}" if epochs else ""
        return f"after epoch {epoch}{of}" if epoch else f"before the last epoch{of}"

    def metrics(self) -> list[dict]:
        """The rows of metrics.jsonl; a half-written last line (a kill during the append) is dropped."""
        path = self.path / "metrics.jsonl"
        # line by line from bytes: a tail a power cut left undecodable is a half-written line too (decoding the
        # whole file raised before any line was read)
        lines = path.read_bytes().splitlines() if path.exists() else []
        rows = []
        for i, line in enumerate(lines):
            try:
                row = json.loads(line.decode())
            except (UnicodeDecodeError, json.JSONDecodeError):
                if i < len(lines) - 1:
                    raise RunDirError(
                        f"{path} line {i + 1} is not JSON; fix or delete that line, then resume"
                    ) from None
                continue
            if not isinstance(row, dict):
                raise RunDirError(f"{path} line {i + 1} is not a metrics row (a JSON object); fix or delete it")
            rows.append(row)
        return rows

    def remove_stale_temp_files(self) -> None:
        """Temporary files of atomic writes that a kill interrupted (`.latest.pt.XXXX`): never read, only clutter.
        Only the temporaries of the files a run writes itself: `.*.*` took a user's hidden files too (`.notes.txt`),
        and an `arat export RUN/x.pt` writing at the same moment."""
        for folder, own in ((self.path, OWN_FILES), (self.checkpoints, (LATEST, FINAL))):
            for tmp in folder.iterdir() if folder.is_dir() else []:
                stale = TEMP_NAME.fullmatch(tmp.name)
                if stale and stale.group(1) in own and tmp.is_file():
                    tmp.unlink(missing_ok=True)

    def rewrite_metrics(self, rows: list[dict]) -> None:
        text = "".join(json.dumps(r) + "\n" for r in rows)
        atomic_write(self.path / "metrics.jsonl", lambda f: f.write(text.encode()))

    def append_metrics(self, row: dict) -> None:
        """One row, on disk before the epoch's checkpoint is written (a power cut between them keeps the row)."""
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
