"""The `arat-gpu-check/1` schema of gpu_check.json and the output-folder limits, as checks. Torch-free."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from . import STAGE_NAMES

SCHEMA = "arat-gpu-check/1"
TOP_KEYS = (
    "schema", "commit", "dirty", "started", "elapsed_s", "budget_s", "cpu_smoke", "env", "ceilings", "stages",
    "summary",
)  # fmt: skip
CEILING_KEYS = ("copy_tb_s", "bf16_matmul_tflops")
STAGE_KEYS = ("status", "seconds", "cap_s", "rc", "reason", "error", "log_tail", "rows", "figures")
STATUSES = ("ok", "failed", "timeout", "skipped")
SUMMARY_KEYS = ("eager", "compiled", "graphs", "recompiles_after_warmup", "kernels", "wrn34_10", "real_run", "aa")

OUTPUT_FILES = (
    "gpu_check.json", "gpu_check.md", "gpu_check.log", "compile_log.txt", "profile_eager.txt",
    "profile_compiled.txt", "pytest_probes.txt", "pytest_kernels.txt",
)  # fmt: skip
MAX_FILES = 8
MAX_FILE_BYTES = 16 * 1024 * 1024  # each file stays strictly under this
NAME_RE = re.compile(r"[A-Za-z0-9._-]+")


def validate(doc: Any) -> list[str]:
    """Everything that makes `doc` not a valid arat-gpu-check/1 document (empty: valid)."""
    if not isinstance(doc, dict):
        return ["the document is not an object"]
    problems = [f"missing top-level key {k!r}" for k in TOP_KEYS if k not in doc]
    if doc.get("schema") != SCHEMA:
        problems.append(f"schema is {doc.get('schema')!r}, not {SCHEMA!r}")
    if not isinstance(doc.get("ceilings"), dict) or any(k not in doc["ceilings"] for k in CEILING_KEYS):
        problems.append(f"ceilings must hold {', '.join(CEILING_KEYS)}")
    if not isinstance(doc.get("summary"), dict) or any(k not in doc["summary"] for k in SUMMARY_KEYS):
        problems.append(f"summary must hold {', '.join(SUMMARY_KEYS)}")
    stages = doc.get("stages")
    if not isinstance(stages, dict) or list(stages) != STAGE_NAMES:
        return problems + [f"stages must hold exactly {', '.join(STAGE_NAMES)}, in order"]
    for name, record in stages.items():
        problems += [f"stages.{name}: {p}" for p in validate_stage(record)]
    return problems


def validate_stage(record: Any) -> list[str]:
    if not isinstance(record, dict):
        return ["not an object"]
    problems = [f"missing key {k!r}" for k in STAGE_KEYS if k not in record]
    status = record.get("status")
    if status not in STATUSES:
        problems.append(f"status {status!r} is not one of {', '.join(STATUSES)}")
    if status == "skipped" and not record.get("reason"):
        problems.append("a skipped stage needs a reason")
    if status in ("failed", "timeout") and not record.get("error"):
        problems.append(f"a {status} stage needs an error")
    if not isinstance(record.get("rows"), list) or not isinstance(record.get("figures"), dict):
        problems.append("rows must be a list and figures an object")
    return problems


def check_output_dir(out: str | Path) -> list[str]:
    """The output limits: at most 8 plain files, names [A-Za-z0-9._-]+, each under 16 MiB."""
    entries = sorted(Path(out).iterdir())
    problems = [f"{len(entries)} entries (at most {MAX_FILES})"] if len(entries) > MAX_FILES else []
    for path in entries:
        if not path.is_file() or path.is_symlink():
            problems.append(f"{path.name}: not a plain file")
        elif path.stat().st_size >= MAX_FILE_BYTES:
            problems.append(f"{path.name}: {path.stat().st_size} bytes (limit {MAX_FILE_BYTES})")
        if not NAME_RE.fullmatch(path.name):
            problems.append(f"{ascii(path.name)}: name outside [A-Za-z0-9._-]")
    return problems
