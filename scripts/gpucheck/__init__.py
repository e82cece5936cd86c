"""The GPU check's driver library (../shared/docs/GPU_CHECK.md): one module per group of stages, plus the merge.

`scripts/gpu_check.sh` runs each stage as its own process through `scripts/gpu_check.py --stage NAME`; the
modules here are imported from there (scripts/ on sys.path), never installed. Only `record`, `schema` and `merge`
are torch-free, so the merge starts in well under a second.
"""

from __future__ import annotations

# (stage, cap in seconds), in priority order; gpu_check.sh holds the same list (tests/test_gpu_check.py compares).
STAGES: list[tuple[str, int]] = [
    ("env", 25),  # 15 in the specification: the H200 took 12.9-14.2 s (the copy's hashes, a git subprocess)
    ("ceilings", 15),
    ("kernels_correct", 40),
    ("kernels_speed", 35),
    ("step_eager", 60),
    ("compile", 150),
    ("methods", 35),
    ("real_run", 105),
    ("probes", 35),
    ("pytest_kernels", 45),
    ("eval", 150),  # beyond the specification's ten (whose caps fill the 480 s): it runs in the time they leave
]
STAGE_NAMES = [name for name, _ in STAGES]
CAPS = dict(STAGES)
