"""The merge: every `<stage>.json` and `<stage>.status` of the work folder -> the 8 output files and the summary
table, printed last. A re-run of one stage replaces only that stage's record. Torch-free, so it starts at once."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from . import CAPS, STAGE_NAMES
from .record import read_commit, write_json_atomic, write_text_atomic
from .schema import MAX_FILE_BYTES, OUTPUT_FILES, SCHEMA, check_output_dir, validate
from .summary import headline_rows, markdown_table, stage_rows, summarize

LOG_TAIL_LINES = 40
LOG_CUT_BYTES = 200 * 1024  # per log in gpu_check.log
SIDE_FILES = ("profile_eager.txt", "profile_compiled.txt", "pytest_probes.txt", "pytest_kernels.txt")
SIDE_CUT_BYTES = 8 * 1024 * 1024
COMPILE_LINE = re.compile(
    r"recompil|graph.break|as dynamic|marked dynamic|create_symbol|skipping cudagraphs|cudagraph|dual_bn layout",
    re.IGNORECASE,
)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def tail_text(path: Path, max_bytes: int) -> str:
    """The last `max_bytes` of a file, cut at a line start, with a note when cut."""
    if not path.is_file():
        return ""
    size = path.stat().st_size
    with path.open("rb") as f:
        f.seek(max(0, size - max_bytes))
        data = f.read().decode("utf-8", errors="replace")
    if size > max_bytes:
        data = f"[... first {size - max_bytes} bytes cut ...]\n" + data.partition("\n")[2]
    return data


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    return tail_text(path, 64 * 1024).splitlines()[-lines:]


STOPPED = "the check was stopped"  # a status reason: the check's own end (a signal), not the stage's cap


def stage_record(work: Path, name: str) -> dict[str, Any]:
    """One stage's entry of gpu_check.json, from the orchestrator's status and the driver's record."""
    status = read_json(work / f"{name}.status")
    data = read_json(work / f"{name}.json") or {}
    if status is None and data:  # a record but no exit status: the check itself was stopped during this stage
        status = {"status": "timeout", "rc": None, "seconds": None, "reason": f"{STOPPED} in this stage"}
    if status is None:
        return empty_record(name, "not run (not selected, or no run in this work folder yet)")
    record = {
        "status": status["status"],
        "seconds": status.get("seconds"),
        "cap_s": status.get("cap_s", CAPS[name]),
        "rc": status.get("rc"),
        "reason": status.get("reason"),
        "error": data.get("error"),
        "log_tail": None,
        "rows": data.get("rows", []),
        "figures": data.get("figures", {}),
    }
    settle_status(record, data, work / f"{name}.log")
    return record


def settle_status(record: dict[str, Any], data: dict[str, Any], log: Path) -> None:
    """Fold the driver's view (its own skip, its error, a cut in an optional phase) into the exit-code status; add
    the log tail on trouble."""
    cut = data.get("optional_phase") or data.get("figures", {}).get("cut")
    if cut and record["status"] in ("ok", "timeout"):  # a timeout here: killed before its handler ran, same verdict
        record["status"] = "failed" if data.get("error") else "ok"
        record["reason"] = f"cut at the cap during the optional {cut}"
        if record["status"] == "failed":
            record["log_tail"] = log_tail(log)
        return
    if record["status"] == "ok" and not data:
        record["status"], record["error"] = "failed", "the stage exited 0 but wrote no record"
    elif record["status"] == "ok" and data.get("skipped"):
        record["status"], record["reason"] = "skipped", data["skipped"]
    elif record["status"] == "ok" and data.get("error"):
        record["status"] = "failed"
    if record["status"] == "timeout":
        earlier = data.get("error") if "SIGTERM" not in str(data.get("error")) else None
        cap = f"{record['cap_s']} s cap"
        if str(record.get("reason") or "").startswith(STOPPED):  # the whole check was stopped, not at the stage's cap
            when = f" after {record['seconds']} s" if record.get("seconds") is not None else ""
            ended = f"{STOPPED}{when}, before this stage's {cap}"
        else:
            ended = f"timeout at the {cap}"
        record["error"] = f"{ended} ({len(record['rows'])} rows kept)" + (
            f"; first failure before it: {earlier}" if earlier else ""
        )
    if record["status"] == "failed" and not record["error"]:
        lines = [line for line in log_tail(log) if line.strip()]
        record["error"] = lines[-1][:500] if lines else f"exit code {record['rc']}"
    if record["status"] in ("failed", "timeout"):
        record["log_tail"] = log_tail(log)


def empty_record(name: str, reason: str) -> dict[str, Any]:
    return {
        "status": "skipped",
        "seconds": 0,
        "cap_s": CAPS[name],
        "rc": None,
        "reason": reason,
        "error": None,
        "log_tail": None,
        "rows": [],
        "figures": {},
    }


def build_document(work: Path, repo: Path) -> dict[str, Any]:
    run = read_json(work / "run.json") or {}
    stages = {name: stage_record(work, name) for name in STAGE_NAMES}
    env = stages["env"]["figures"]
    commit, dirty = read_commit(repo)
    ceilings = stages["ceilings"]["figures"]
    started_ms = run.get("started_ms")
    ended = max((p.stat().st_mtime for p in work.glob("*.status")), default=time.time())  # a later re-merge too
    return {
        "schema": SCHEMA,
        "commit": env.get("commit", commit),
        "dirty": env.get("dirty", dirty),
        "started": run.get("started"),
        "elapsed_s": round(ended - started_ms / 1000, 1) if started_ms else None,
        "budget_s": run.get("budget_s"),
        "cpu_smoke": run.get("cpu_smoke", False),
        "env": env,
        "ceilings": {"copy_tb_s": ceilings.get("copy_tb_s"), "bf16_matmul_tflops": ceilings.get("bf16_matmul_tflops")},
        "stages": stages,
        "summary": summarize(stages),
    }


def render_markdown(doc: dict[str, Any]) -> str:
    parts = [
        f"# GPU check ({doc['env'].get('gpu_name') or 'no GPU'}, {doc['started']}, commit {doc['commit']}"
        f"{' dirty' if doc['dirty'] else ''}{', CPU SMOKE' if doc['cpu_smoke'] else ''})",
        "",
        markdown_table(["stage", "status", "s", "cap", "error / reason"], stage_rows(doc)),
        "",
        markdown_table(["headline", "value"], headline_rows(doc)),
    ]
    for name, record in doc["stages"].items():
        parts += ["", f"## {name}: {record['status']}", ""]
        if record["error"] or record["reason"]:
            parts += [f"{record['error'] or record['reason']}", ""]
        if record["figures"]:
            parts += ["```json", json.dumps(record["figures"], indent=1, default=str)[:20000], "```", ""]
        parts += [rows_table(record["rows"])]
    return "\n".join(parts) + "\n"


def rows_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no rows)"
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns and k != "traceback"]
    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    return markdown_table(columns, cells)


def cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text.replace("|", "\\|").replace("\n", " ")[:200]


def write_log(work: Path, path: Path) -> None:
    """Stage logs, pip.log and prepare.log, each cut to its last 200 KB."""
    names = [f"{name}.log" for name in STAGE_NAMES] + ["pip.log", "prepare.log"]
    present = [name for name in names if (work / name).is_file()]
    parts = [f"===== {name} =====\n{tail_text(work / name, LOG_CUT_BYTES)}\n" for name in present]
    write_text_atomic(path, "".join(parts))


def write_compile_log(work: Path, path: Path) -> bool:
    """Recompile, graph-break, dynamic-shape and cudagraph lines of the compile stage's torch logs and its log."""
    lines = []
    for source in (work / "compile_torch_logs.txt", work / "compile.log", work / "compile_notes.txt"):
        kept = [line for line in tail_text(source, 32 * 1024 * 1024).splitlines() if COMPILE_LINE.search(line)]
        if kept:
            lines += [f"===== {source.name} ({len(kept)} lines) ====="] + kept
    if not lines:
        return False
    text = "\n".join(lines) + "\n"
    write_text_atomic(path, text[-SIDE_CUT_BYTES:])
    return True


def write_outputs(doc: dict[str, Any], work: Path, out: Path) -> list[str]:
    """Writes the (at most 8) output files, removes stale ones of ours; returns the limit problems."""
    out.mkdir(parents=True, exist_ok=True)
    written = {"gpu_check.json", "gpu_check.md", "gpu_check.log"}
    write_json_atomic(out / "gpu_check.json", doc)
    write_text_atomic(out / "gpu_check.md", render_markdown(doc)[: MAX_FILE_BYTES // 2])
    write_log(work, out / "gpu_check.log")
    if write_compile_log(work, out / "compile_log.txt"):
        written.add("compile_log.txt")
    for name in SIDE_FILES:
        if (work / name).is_file():
            write_text_atomic(out / name, tail_text(work / name, SIDE_CUT_BYTES))
            written.add(name)
    for name in set(OUTPUT_FILES) - written:
        (out / name).unlink(missing_ok=True)  # a previous run's file that this run did not produce
    return check_output_dir(out)


def print_summary(doc: dict[str, Any], out: Path, problems: list[str]) -> None:
    lines = [
        "",
        markdown_table(["stage", "status", "s", "cap", "error / reason"], stage_rows(doc)),
        "",
        markdown_table(["headline", "value"], headline_rows(doc)),
    ]
    lines += [f"PROBLEM: {p}" for p in problems]
    lines.append(f"outputs: {out}/ ({', '.join(sorted(p.name for p in out.iterdir()))})")
    print("\n".join(lines)[-10_000:], flush=True)


def merge(work: Path, out: Path, repo: Path) -> int:
    work, out = Path(work), Path(out)
    if not work.is_dir():
        print(f"gpu_check --merge: {work} is not a folder")
        return 2
    doc = build_document(work, repo)
    problems = [f"schema: {p}" for p in validate(doc)]
    problems += write_outputs(doc, work, out)
    print_summary(doc, out, problems)
    return 1 if problems else 0
