"""Stages `env` (versions, device, defaults, commit) and `ceilings` (copy bandwidth and bf16 matmul throughput)."""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import sys
from typing import Any

import torch
from harness import cpu_model  # bench/ is on sys.path (scripts/gpu_check.py)

import kernels
from engine.perf import gpu_model
from engine.rundir import package_version

from .record import REPO, SMOKE_SKIP, StageFailed, StageRecord, read_commit

NVIDIA_SMI_QUERY = [
    "nvidia-smi",
    "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,power.limit",
    "--format=csv",
]
COPY_BYTES = 4 * 2**30
MATMUL_N = 8192
EXPECTED = {"copy_tb_s": 4.3, "bf16_matmul_tflops": 790.0}  # measured on the target H200 (GPU_CHECK.md)
# Other GPUs the device tool lends: ~90% of the datasheet's memory bandwidth and ~75% of its dense bf16 peak (the
# H200's measured ratios), not measured here. The first key found in the name (PCIe and NVL before the SXM H100).
EXPECTED_BY_GPU = {
    "H100 PCIe": {"copy_tb_s": 1.8, "bf16_matmul_tflops": 570.0},
    "H100 NVL": {"copy_tb_s": 3.5, "bf16_matmul_tflops": 630.0},
    "H100": {"copy_tb_s": 3.0, "bf16_matmul_tflops": 740.0},
    "H200": EXPECTED,
}


def expected_ceilings(gpu_name: str) -> dict[str, float] | None:
    """What the ceilings should reach on `gpu_name` (an H100 flagged against the H200's 4.3 TB/s read as throttled);
    None for a GPU not listed (an A100 or a 4090 held to the H200's figures was always "throttled"), and for a MIG
    slice (a fraction of the whole GPU's)."""
    model = gpu_model(gpu_name, EXPECTED_BY_GPU)  # whole words: a GH200 (its own memory) is no H200
    return EXPECTED_BY_GPU[model] if model else None


FLAG_BELOW = 0.7
NOT_COVERED = {  # recorded as skipped, with the reason
    "DDP": "needs >= 2 GPUs (and a multi-process launch)",
    "FFCV, DALI": "not installable offline on the GPU machine (data.backend=device only)",
    "compute-sanitizer": "only for a rerun, if kernels_correct shows an error that moves between runs",
}


def nvidia_smi() -> dict[str, Any]:
    """The read-only query (no setting is changed), as {header: value} for the first GPU."""
    if shutil.which("nvidia-smi") is None:
        return {"error": "nvidia-smi not found"}
    try:
        done = subprocess.run(NVIDIA_SMI_QUERY, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError) as exc:
        return {"error": str(exc)}
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    if done.returncode != 0 or len(lines) < 2:
        return {"error": (done.stderr or done.stdout).strip()[-300:]}
    header = [h.strip() for h in lines[0].split(",")]
    return dict(zip(header, [v.strip() for v in lines[1].split(",")], strict=False)) | {"gpus": len(lines) - 1}


def smi_figures() -> dict[str, Any]:
    smi = nvidia_smi() if torch.cuda.is_available() or shutil.which("nvidia-smi") else {"error": "no CUDA"}
    return {"driver": smi.get("driver_version"), "nvidia_smi": smi}


def module_version(name: str) -> str | None:
    """__version__ of an importable module without metadata (the slim .gpucheck/site/ form)."""
    try:
        module = __import__(name)
    except ImportError:
        return None
    return getattr(module, "__version__", "importable, version unknown")


def event_median_ms(fn, warmup: int, reps: int) -> float:
    """Median ms of fn() between two CUDA events per call (the ceilings' ops take milliseconds: the launch is noise)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def versions() -> dict[str, Any]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "numpy": package_version("numpy"),  # the GPU image's (2.5 seen there) is newer than any CPU run's
        "pyautoattack": package_version("pyautoattack") or module_version("pyautoattack"),
        "pyautoattack_from": autoattack_location(),
        "cpu": cpu_model(),  # the host runs the launches: launch-bound figures depend on it
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "executable": sys.executable,
    }


def autoattack_location() -> str | None:
    from importlib.util import find_spec

    spec = find_spec("pyautoattack")
    return os.path.dirname(spec.origin) if spec and spec.origin else None


def device_properties() -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {"cuda_available": False}
    props = torch.cuda.get_device_properties(0)
    return {
        "cuda_available": True,
        "gpu_name": props.name,
        "gpu_count": torch.cuda.device_count(),
        "capability": f"{props.major}.{props.minor}",
        "sm_count": props.multi_processor_count,
        "l2_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
        "memory_gib": round(props.total_memory / 2**30, 1),
        "bf16_native": torch.cuda.is_bf16_supported(including_emulation=False),
    }


def tf32_defaults() -> dict[str, Any]:
    return {
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
    }


def env(record: StageRecord) -> None:
    """Versions and the commit are flushed first, then the device (its first CUDA context), then nvidia-smi: on a
    machine just started, a cut at the stage's cap keeps what was read before it."""
    commit, dirty = read_commit(REPO)
    figures: dict[str, Any] = {}
    for part in (lambda: {**versions(), "commit": commit, "dirty": dirty,
                          "triton_interpret": os.environ.get("TRITON_INTERPRET")},
                 device_properties, lambda: {"tf32": tf32_defaults()}, smi_figures,
                 lambda: {"kernels": kernels.available_backends()}):  # fmt: skip
        found = part()
        figures |= found
        for key, value in found.items():
            record.figure(key, value)
    record.row({"case": "env", **{k: v for k, v in figures.items() if not isinstance(v, dict)}})
    for case, reason in NOT_COVERED.items():
        record.row({"case": case, "status": f"skipped: {reason}"})
    record.figure("not_covered", NOT_COVERED)
    if not torch.cuda.is_available() and not record.smoke:
        raise StageFailed("CUDA is not available: torch.cuda.is_available() is False")


def measure_copy() -> dict[str, Any]:
    """A device-to-device copy of 4 GiB (at most an eighth of the GPU's memory: two buffers on an 8 GB card ran
    out); bandwidth counts read + write."""
    size = min(COPY_BYTES, torch.cuda.get_device_properties(0).total_memory // 8)
    src = torch.empty(size, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = event_median_ms(lambda: dst.copy_(src), 3, 10)
    value = round(2 * size / ms / 1e9, 3)
    return {"case": f"copy {size / 2**30:.3g} GiB d2d", "median_ms": round(ms, 3), "value": value}


def measure_matmul() -> dict[str, Any]:
    """The matrix-product ceiling in bf16, or fp16 where the GPU has no bf16 tensor cores (emulated bf16 is not its
    ceiling); the case names which."""
    from engine.perf import resolve_dtype

    dtype = resolve_dtype("auto", torch.device("cuda"))[0]  # bf16 where native, else fp16
    a = torch.randn(MATMUL_N, MATMUL_N, device="cuda", dtype=dtype)
    b = torch.randn_like(a)
    ms = event_median_ms(lambda: a @ b, 3, 10)
    return {
        "case": f"{'bf16' if dtype == torch.bfloat16 else 'fp16'} matmul {MATMUL_N}^3",
        "median_ms": round(ms, 3),
        "value": round(2 * MATMUL_N**3 / ms / 1e9, 1),
    }


def ceilings(record: StageRecord) -> None:
    flags = []
    expected = expected_ceilings(torch.cuda.get_device_name() if torch.cuda.is_available() else "")
    for key, measure in (("copy_tb_s", measure_copy), ("bf16_matmul_tflops", measure_matmul)):
        if not torch.cuda.is_available():
            record.row({"case": key, "status": SMOKE_SKIP if record.smoke else "skipped: no CUDA"})
            continue
        row = measure() | {"figure": key, "expected": expected[key] if expected else None}
        row["flag"] = bool(expected) and row["value"] < FLAG_BELOW * expected[key]
        if row["flag"]:
            flags.append(f"{key} {row['value']} < 70% of {expected[key]}: throttled or shared GPU?")
        record.row(row)
        record.figure(key, row["value"])
        if key == "bf16_matmul_tflops":  # (fp16 where the GPU has no bf16: the key stays, the summary says which)
            record.figure("matmul_dtype", row["case"].split()[0])
    record.figure("flags", flags)
    if not torch.cuda.is_available() and not record.smoke:
        raise StageFailed("CUDA is not available")
