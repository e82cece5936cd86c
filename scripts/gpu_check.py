"""The GPU check's driver (../shared/docs/GPU_CHECK.md; run through scripts/gpu_check.sh).

    python scripts/gpu_check.py --stage NAME --json PATH --budget S [--cpu-smoke]   # one stage -> PATH
    python scripts/gpu_check.py --merge WORKDIR --out OUTDIR                         # outputs + summary table

A stage writes its rows to PATH after every row and exits 1 when a pass criterion fails (rows written first).
Side files (profiles, pytest output, compile log) go next to PATH; the merge copies them to OUTDIR.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "bench", REPO / "scripts"):  # the package is not installed on the GPU machine
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from gpucheck import STAGE_NAMES  # noqa: E402
from gpucheck.record import StageFailed, StageRecord, child_processes, error_line  # noqa: E402

# stage -> "module.function" in scripts/gpucheck/; each function takes the stage's StageRecord
STAGE_FUNCTIONS = {
    "env": "env.env",
    "ceilings": "env.ceilings",
    "kernels_correct": "kernels_correct.kernels_correct",
    "kernels_speed": "kernels_speed.kernels_speed",
    "step_eager": "steps.step_eager",
    "compile": "compiled.compile_stage",
    "methods": "methods.methods",
    "real_run": "real_run.real_run",
    "probes": "pytest_stages.probes",
    "pytest_kernels": "pytest_stages.pytest_kernels",
    "eval": "evaluation.eval_stage",
}
COMPILE_LOGS = "recompiles,graph_breaks,dynamic,perf_hints"


def prepare_process(stage: str, work: Path) -> None:
    """Settings that must precede `import torch`: the compile stage's logs go to a file the merge filters."""
    if stage == "compile":
        logs = work / "compile_torch_logs.txt"
        logs.unlink(missing_ok=True)  # torch appends: an earlier run's recompiles must not read as this run's
        os.environ["TORCH_LOGS"] = COMPILE_LOGS
        os.environ["TORCH_LOGS_OUT"] = str(logs)


def on_sigterm(record: StageRecord):
    def handler(signum, frame):  # timeout(1) sends SIGTERM at the cap: keep the rows, mark the cut, leave
        for pid in list(child_processes):  # groups of our own children outside timeout's process group
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)
        if record.on_timeout is not None:
            with contextlib.suppress(Exception):
                record.on_timeout()
        if record.cut():  # an optional phase: the stage's criteria were settled before it
            record.data["finished"] = True
            record.flush()
            os._exit(1 if record.failed else 0)
        if record.data["error"] is None:
            record.data["error"] = "stopped at the stage's cap (SIGTERM)"
        record.flush()
        os._exit(124)

    return handler


def run_stage(stage: str, json_path: Path, budget: float, smoke: bool) -> int:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    prepare_process(stage, json_path.parent)
    record = StageRecord(stage, json_path, budget, smoke)
    record.flush()
    signal.signal(signal.SIGTERM, on_sigterm(record))
    try:
        module, function = STAGE_FUNCTIONS[stage].split(".")
        getattr(importlib.import_module(f"gpucheck.{module}"), function)(record)
    except StageFailed as exc:
        record.fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - the record says what broke; the orchestrator goes on
        traceback.print_exc()
        record.fail(error_line(exc))
    record.finish()
    print(f"{stage}: {'FAILED: ' + record.data['error'] if record.failed else 'ok'}", flush=True)
    return 1 if record.failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", choices=STAGE_NAMES)
    p.add_argument("--json", type=Path, help="the stage's record (rewritten after every row)")
    p.add_argument("--budget", type=float, default=60.0, help="the stage's cap in seconds")
    p.add_argument("--cpu-smoke", action="store_true", help="shrink everything to a CPU-sized run")
    p.add_argument("--merge", type=Path, metavar="WORKDIR", help="merge every <stage>.json of WORKDIR")
    p.add_argument("--out", type=Path, help="output folder of --merge")
    args = p.parse_args(argv)
    if args.merge:
        if args.out is None:
            p.error("--merge needs --out")
        from gpucheck.merge import merge

        return merge(args.merge, args.out, REPO)
    if not (args.stage and args.json):
        p.error("give --stage NAME --json PATH, or --merge WORKDIR --out OUTDIR")
    return run_stage(args.stage, args.json, args.budget, args.cpu_smoke)


if __name__ == "__main__":
    sys.exit(main())
