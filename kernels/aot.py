"""Ahead-of-time compilation of every Triton kernel for sm_75 / sm_80 / sm_90 without a GPU, with resource usage.

triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32)) runs the whole pipeline (TTIR -> PTX -> cubin
via the ptxas shipped in the triton wheel); no driver is needed. Registers, shared and local memory come from
`cuobjdump -res-usage` on the cubin; spill bytes from `ptxas -v` re-run on the same PTX with Triton's flags.
Run in a process where triton was imported WITHOUT TRITON_INTERPRET=1 (the interpreter replaces @triton.jit).
"""

from __future__ import annotations

import inspect
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

if "constexprs" not in inspect.signature(ASTSource).parameters:  # an ImportError: the callers' one-line refusal
    raise ImportError(
        f"triton {triton.__version__}'s ASTSource predates the constexprs API these compiles use (triton 3.6 and 3.7 "
        "have it, 3.2, torch 2.6's, does not)"
    )

ARCHS = (75, 80, 90)  # T4 (fp16 autocast: no bf16), A100, H100/H200
_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
# a float min/max without .NaN returns the other operand when one is NaN (tl.maximum's default): a fused ReLU or
# clamp would turn NaN into a number where torch keeps it, hiding a diverged step from the non-finite-loss check
NAN_DROPPING_MINMAX = re.compile(r"\b(?:max|min)(?:\.ftz)?\.(?:f32|f16|bf16|f16x2|bf16x2)\b")


def all_specs() -> list[dict]:
    """Every kernel x config the launchers produce for the shapes we care about (each op's aot_specs.py)."""
    from .dual_bn import aot_specs as dual_bn_specs
    from .pgd_step import aot_specs as pgd_specs

    return pgd_specs.aot_specs() + dual_bn_specs.aot_specs()


def compile_spec(spec: dict, arch: int, float_scalars: str = "fp32") -> dict:
    """Compile one spec for sm_<arch>; returns one JSON-able row of resource usage. float_scalars="fp64" types
    the float arguments as Inductor's launches of user-defined kernels do (a Python float becomes fp64 there; a
    direct launch passes fp32)."""
    fn = spec["fn"]
    signature, constexprs, attrs = _specialise(spec)
    if float_scalars != "fp32":
        signature = {name: float_scalars if kind == "fp32" else kind for name, kind in signature.items()}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": spec["num_warps"]})
    usage = _res_usage(compiled.asm["cubin"])
    return {
        "kernel": spec["name"],
        "arch": f"sm_{arch}",
        "num_warps": spec["num_warps"],
        "registers": usage["REG"],
        "shared_bytes": compiled.metadata.shared,
        "local_bytes": usage["LOCAL"],
        "stack_bytes": usage["STACK"],
        **_ptxas_spills(compiled.asm["ptx"], arch),
        # before sm_80 PTX has no max.NaN: Triton keeps NaN with plain max/min instructions and setp.nan + selp
        # around them, which the pattern would count (None: not read there)
        "nan_dropping_minmax": len(NAN_DROPPING_MINMAX.findall(compiled.asm["ptx"])) if arch >= 80 else None,
        "values": spec.get("values", {}),
    }


def _specialise(spec: dict) -> tuple[dict, dict, dict]:
    """Signature (in argument order), constexprs and attributes as the runtime would build them for these values.

    JITFunction turns an int argument equal to 1 into a constant and marks ints divisible by 16 and (16-byte aligned,
    as torch allocations are) pointers with tt.divisibility=16; "values" holds the ints a launcher passes.
    """
    fn, values = spec["fn"], spec.get("values", {})
    assert set(spec["signature"]) == set(fn.arg_names), f"{spec['name']}: signature must name every argument"
    signature = {name: spec["signature"][name] for name in fn.arg_names}
    constexprs = dict(spec["constexprs"])
    divisible = [name for name, kind in signature.items() if kind.startswith("*")]
    for name, value in values.items():
        if value == 1:
            signature[name], constexprs[name] = "constexpr", 1
        elif value % 16 == 0:
            divisible.append(name)
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    return signature, constexprs, attrs


def _res_usage(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [str(_BIN / "cuobjdump"), "-res-usage", f.name], check=True, capture_output=True, text=True
        ).stdout
    return {key: int(value) for key, value in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}


def _ptxas_spills(ptx: str, arch: int) -> dict[str, int]:
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"  # as triton's sm_arch_from_capability
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        cmd = [
            str(_BIN / "ptxas"),
            "-lineinfo",
            "-v",
            "--regAllocOptLevel=2",
            f"--gpu-name={gpu}",
            str(src),
            "-o",
            str(Path(tmp) / "kernel.o"),
        ]
        log = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
    stores = re.search(r"(\d+) bytes spill stores", log)
    loads = re.search(r"(\d+) bytes spill loads", log)
    return {"spill_store_bytes": int(stores.group(1)), "spill_load_bytes": int(loads.group(1))}
