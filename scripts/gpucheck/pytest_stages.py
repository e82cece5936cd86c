"""Stages `probes` and `pytest_kernels`: the project's own tests on the GPU, output to pytest_probes.txt and
pytest_kernels.txt. pytest runs as a child with a deadline inside the stage's cap, so a cut run still yields its
counts (a partial run counts). No --timeout: KINDS.md lists pytest-timeout on the GPU image, but a per-test limit
below these 35-45 s caps would also cut a test's first Triton or Inductor compile there, a false failure.

probes records the first error line of each failure (they are findings: e.g. test_perf.py's rel 1e-5 under TF32);
pytest_kernels fails when a Triton test fails.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from typing import Any

from .pytest_live import PASSED
from .pytest_live import PREFIX as LIVE
from .record import REPO, StageFailed, StageRecord, child_processes

# the captured attack (the engine's CUDA default, never run on a GPU yet) first: a cut at the cap keeps its results
PROBES = ["tests/test_cuda_graphs.py", "tests/test_perf.py", "tests/test_train.py::test_resume_gives_identical_results",
          "tests/data/test_backends.py::test_batches_on_the_device_equal_the_cpu_device_loaders",
          "tests/data/test_backends.py::test_each_ffcv_batch_is_copied_out_of_ffcv_s_slots_into_fresh_pinned_memory",
          "-m", "not slow"]  # fmt: skip
FIRST_KERNEL_TESTS = "test_triton_ops.py"  # the triton_op route compiled by Inductor: before the cap can cut the run
SMOKE_KERNEL_TESTS = ["tests/kernels/test_pgd_step.py", "-m", "triton", "--maxfail", "10"]  # interpreted: slow
COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)")
COLLECTED = re.compile(r"(\d+)(?:/\d+)? tests? collected")
PROGRESS = re.compile(r"^([.FEsxX]+)\s*(\[\s*\d+%\])?$")
PARSE_MARGIN_S = 2.0
NO_RESULT_RC = (2, 3, 4, 5)  # interrupted, internal error, usage error, nothing collected


def run_pytest(record: StageRecord, args: list[str], out_name: str) -> dict[str, Any]:
    """pytest -q with a deadline; its output goes to `out_name` beside the record. Returns the parsed result. Each
    failure is also written as it happens (gpucheck.pytest_live), so a run cut at the cap still names its failures."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "gpucheck.pytest_live", *args]
    path = os.pathsep.join(filter(None, [str(REPO / "scripts"), os.environ.get("PYTHONPATH")]))
    env = os.environ | {"PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}
    out = record.side_file(out_name)
    start = time.monotonic()
    with out.open("w") as f:
        f.write("$ " + " ".join(cmd[1:]) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
        child_processes.add(proc.pid)  # its own group: killed on our deadline, and by our SIGTERM handler
        record.on_timeout = lambda: salvage(record, out)  # the cap's SIGTERM while the group is being stopped
        try:
            rc, partial = proc.wait(timeout=max(1.0, record.remaining() - PARSE_MARGIN_S)), False
        except subprocess.TimeoutExpired:
            rc, partial = stop_group(proc), True
        child_processes.discard(proc.pid)
        record.on_timeout = None
    result = parse(out.read_text(errors="replace"))
    result |= {"rc": rc, "partial": partial, "seconds": round(time.monotonic() - start, 1)}
    if partial:
        with out.open("a") as f:
            f.write(f"\n[gpu_check: cut at the stage's cap after {result['seconds']} s; counts are partial]\n")
    return result


def salvage(record: StageRecord, out) -> None:
    """At the stage's cap: the counts of the output so far, marked partial (the handler flushes them)."""
    record.data["figures"] |= parse(out.read_text(errors="replace")) | {"rc": None, "partial": True}


def stop_group(proc: subprocess.Popen) -> int | None:
    """SIGTERM, then SIGKILL, to the process group of the pytest we started."""
    for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 2.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            return proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
    return proc.poll()


def parse(text: str) -> dict[str, Any]:
    """Counts from pytest -q output: the final summary line, else the progress characters of a cut run."""
    lines = text.splitlines()
    counts: dict[str, Any] = {}
    summary = next((line for line in reversed(lines) if COUNT.search(line) and " in " in line), None)
    if summary:
        for n, word in COUNT.findall(summary):
            counts[{"error": "errors"}.get(word, word)] = int(n)
    else:
        marks = "".join(m[1] for line in lines if (m := PROGRESS.match(line.strip())))
        counts = {"passed": marks.count("."), "failed": marks.count("F"), "errors": marks.count("E"),
                  "skipped": marks.count("s")}  # fmt: skip
    collected = next((m for line in reversed(lines) if (m := COLLECTED.search(line))), None)
    if collected:  # "5/6 tests collected (1 deselected)": 5 selected
        counts["collected"] = int(collected[1])
    live = [line[len(LIVE) :][:300] for line in lines if line.startswith(LIVE)]  # as they happened: a cut run too
    failures = live or [line[:300] for line in lines if line.startswith(("FAILED ", "ERROR "))]
    passed = [line[len(PASSED) :] for line in lines if line.startswith(PASSED)]  # which ones, by name
    return counts | {"failures": failures[:20], "passed_tests": passed[:300]}


def publish(record: StageRecord, result: dict[str, Any]) -> None:
    record.row({"case": "pytest", **result})
    for key, value in result.items():
        record.figure(key, value)


def probes(record: StageRecord) -> None:
    args = PROBES + (["--collect-only"] if record.smoke else [])  # smoke: minutes of CPU steps; check the ids
    result = run_pytest(record, args, "pytest_probes.txt")
    publish(record, result)
    if result["rc"] in NO_RESULT_RC and not result.get("passed") and not result.get("collected"):
        raise StageFailed(f"pytest could not run the probes (exit {result['rc']}): see pytest_probes.txt")


def kernel_tests() -> list[str]:
    """tests/kernels -m triton, file by file with FIRST_KERNEL_TESTS first (pytest orders a directory's files by
    name, and the stage's cap may cut the run)."""
    files = sorted((REPO / "tests" / "kernels").glob("test_*.py"), key=lambda p: (p.name != FIRST_KERNEL_TESTS, p.name))
    return [str(p.relative_to(REPO)) for p in files] + ["-m", "triton", "--maxfail", "10"]


def pytest_kernels(record: StageRecord) -> None:
    result = run_pytest(record, SMOKE_KERNEL_TESTS if record.smoke else kernel_tests(), "pytest_kernels.txt")
    publish(record, result)
    if result.get("failed") or result.get("errors"):
        first = result["failures"][0] if result["failures"] else f"{result.get('failed')} failed"
        raise StageFailed(f"{result.get('failed', 0)} failed, {result.get('errors', 0)} errors; first: {first}")
    if result["rc"] in NO_RESULT_RC and not result.get("passed"):
        raise StageFailed(f"pytest could not run tests/kernels (exit {result['rc']}): see pytest_kernels.txt")
