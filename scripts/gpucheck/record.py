"""One stage's record: rows and figures, rewritten to `$W/<stage>.json` after every change (temp file, then rename),
so a stage killed on timeout keeps what it measured. Torch-free."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
import traceback
from pathlib import Path
from typing import Any

SMOKE_SKIP = "skipped: cpu-smoke"
BUDGET_SKIP = "skipped: budget"
REPO = Path(__file__).resolve().parents[2]
CASE_MARGIN = 1.25  # has_time_for: the next case of a kind may take this much longer than its longest warm one
FLUSH_MARGIN_S = 3.0  # kept free before the stage's cap: the last flush must land before `timeout` kills it
child_processes: set[int] = set()  # process groups a stage started in their own session (pytest): killed on SIGTERM


class StageFailed(Exception):
    """A pass criterion failed after the rows were written; the driver exits 1 with this message as the error."""


def clean(value: Any) -> Any:
    """JSON-safe: NaN/inf become strings (json.dumps would write invalid JSON), tuples become lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def write_text_atomic(path: Path, text: str) -> None:
    """`text` at `path` through a temporary file and a rename: a check killed at the device's time limit while
    writing leaves the last whole file (its output folder is the only copy that comes back)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(clean(data), indent=1, default=str) + "\n")  # default: never lose a row


class StageRecord:
    """What a stage measured. `budget_s` is the stage's cap: `remaining()` counts down to it."""

    def __init__(self, stage: str, path: str | Path, budget_s: float, smoke: bool):
        self.path = Path(path)
        self.work = self.path.parent
        self.smoke = smoke
        self.deadline = time.monotonic() + budget_s
        self.data: dict[str, Any] = {
            "stage": stage,
            "cpu_smoke": smoke,
            "budget_s": budget_s,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "finished": False,
            "skipped": None,  # a reason: the stage chose not to run (e.g. pyautoattack absent)
            "optional_phase": None,  # the optional measurement running now: a cut at the cap there is not a timeout
            "error": None,  # the first failing criterion, or the exception's last line
            "rows": [],
            "figures": {},
        }
        self.on_timeout = None  # called by the driver's SIGTERM handler before the last flush (salvage results)
        self.case_s: dict[str, list[float]] = {}  # seconds of each case of each kind (`timed_case`)

    # -- writing ---------------------------------------------------------------------------------------------
    def flush(self) -> None:
        write_json_atomic(self.path, self.data)

    def row(self, row: dict[str, Any]) -> dict[str, Any]:
        self.data["rows"].append(row)
        self.flush()
        return row

    def figure(self, key: str, value: Any) -> None:
        self.data["figures"][key] = value
        self.flush()

    def fail(self, message: str) -> None:
        """Note a failed criterion (the first one is the stage's error) and keep going."""
        if self.data["error"] is None:
            self.data["error"] = message
        self.flush()

    def skip(self, reason: str) -> None:
        self.data["skipped"] = reason
        self.flush()

    def finish(self) -> None:
        self.data["finished"] = True
        self.flush()

    @contextlib.contextmanager
    def optional(self, name: str):
        """Measurements the stage can do without: a cut at the cap inside (SIGTERM, or the kill after it) ends the
        stage as ok, its pass criteria already settled, with a `cut` row instead of a timeout."""
        outer = self.data["optional_phase"]
        self.data["optional_phase"] = name
        self.flush()
        try:
            yield
        finally:
            self.data["optional_phase"] = outer
            self.flush()

    def cut(self) -> bool:
        """At the cap: a `cut` row when an optional phase was running (then the stage counts as done)."""
        phase = self.data.get("optional_phase")
        if phase is None:
            return False
        self.data["rows"].append({"case": phase, "status": "cut at the stage's cap (optional)"})
        self.data["figures"]["cut"] = phase
        return True

    @property
    def failed(self) -> bool:
        return self.data["error"] is not None

    # -- time ------------------------------------------------------------------------------------------------
    def remaining(self) -> float:
        """Seconds left before the stage must have flushed (its cap minus a margin)."""
        return self.deadline - FLUSH_MARGIN_S - time.monotonic()

    def has_time(self, seconds: float) -> bool:
        return self.remaining() >= seconds

    def has_time_for(self, kind: str, minimum: float) -> bool:
        """Time for one more case of `kind`: `minimum`, or more where a case of its kind took longer, the first
        (cold: compiles, autotuning) not counted. The longest, not the last: the cases of a kind differ (methods'
        standard training, no attack, runs just before ARREST's). A case cut at the cap ends the stage as a
        timeout; one skipped for budget leaves it ok."""
        warm = self.case_s.get(kind, [])[1:]
        return self.has_time(max(minimum, CASE_MARGIN * max(warm) if warm else 0.0))

    @contextlib.contextmanager
    def timed_case(self, kind: str):
        """Measures one case for `has_time_for`."""
        start = time.monotonic()
        try:
            yield
        finally:
            self.case_s.setdefault(kind, []).append(time.monotonic() - start)

    # -- files next to the record ------------------------------------------------------------------------------
    def side_file(self, name: str) -> Path:
        return self.work / name


def error_line(exc: BaseException) -> str:
    """The exception's last line, as a traceback would end."""
    return traceback.format_exception_only(type(exc), exc)[-1].strip()[:500]


def traceback_tail(exc: BaseException, lines: int = 6) -> list[str]:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return [line for line in text.splitlines() if line.strip()][-lines:]


def guarded(record: StageRecord, name: str, fn, *args, **kwargs) -> dict[str, Any]:
    """Run one optional measurement; an exception becomes a row with its last lines instead of ending the stage."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - one broken case must not hide the others
        row = {"case": name, "ok": False, "error": error_line(exc), "traceback": traceback_tail(exc)}
        record.row(row)
        return row


def profile_or_error(fn, *args, **kwargs) -> dict[str, Any]:
    """A measured row's profile (fn's figures), or {"profile_error": ...} where the profiler raised: the row's timing
    stands (a profiler over CUDA-graph replays had never run; its failure lost the headline row with it)."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the figures measured before it are the row's
        return {"profile_error": error_line(exc)}


def read_commit(repo: str | Path) -> tuple[str | None, bool | None]:
    """(commit, dirty) from `.gpucheck/commit.txt` where every file still matches the sums written with it (the
    prepare step's stamp: the tree is the stamped one, whatever a copied .git says; the H200 copy of 2026-12-04 held a
    stale .git), else from git where the checkout has .git, else from the stamp, marked with the files changed since."""
    import subprocess

    stamp = Path(repo) / ".gpucheck" / "commit.txt"
    has_git = (Path(repo) / ".git").exists()
    stamped = None
    if stamp.is_file():
        words = stamp.read_text().split()
        commit, dirty = (words[0] if words else None), "dirty" in words[1:]
        changed = changed_since_stamp(repo)
        if commit and not changed and (Path(repo) / ".gpucheck" / "files.sha256").is_file():
            stamped = commit, dirty
        elif not has_git:
            if commit and changed:
                commit += f" + {len(changed)} files changed after the stamp ({', '.join(changed[:3])})"
            return commit, dirty or bool(changed)
    elif not has_git:
        return None, None
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        head = None
    from_git = (head.stdout.strip(), bool(status.stdout.strip())) if head and head.returncode == 0 else (None, None)
    if stamped is None:
        return from_git
    if from_git[0] and from_git[0] != stamped[0]:
        return f"{stamped[0]} (the files match its stamp; .git says {from_git[0][:12]})", stamped[1]
    return stamped


def changed_since_stamp(repo: str | Path) -> list[str]:
    """The files whose content differs from `.gpucheck/files.sha256` (written with the commit stamp by the prepare
    step: a change after it makes the stamp stale), deleted ones included, added ones not; [] without that file.
    sha256sum's format: `DIGEST  NAME`, or `\\DIGEST  NAME` with backslashes, newlines and returns in NAME escaped."""
    import hashlib

    sums = Path(repo) / ".gpucheck" / "files.sha256"
    if not sums.is_file():
        return []
    changed = []
    for line in sums.read_text(errors="surrogateescape").split("\n"):
        escaped = line.startswith("\\")
        digest, _, name = line.removeprefix("\\").partition("  ")
        if escaped:
            name = re.sub(r"\\(.)", lambda m: {"n": "\n", "r": "\r"}.get(m[1], m[1]), name)
        try:
            now = hashlib.sha256((Path(repo) / name).read_bytes()).hexdigest()
        except OSError:
            now = None
        if name and now != digest:
            changed.append(name)
    return changed
