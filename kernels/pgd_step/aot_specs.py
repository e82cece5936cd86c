"""The Triton kernel x config list that kernels.aot compiles ahead of time for the PGD ops."""

from __future__ import annotations

from .triton_impl import BLOCK, NUM_WARPS, _pgd_step_kernel, _uniform_start_kernel


def aot_specs() -> list[dict]:
    """Every kernel x config compiled ahead of time by kernels.aot (signatures as the launchers specialise them)."""
    specs = []
    for dtype in ("fp32", "bf16", "fp16"):  # fp16: autocast's dtype on a GPU without bf16 (and perf.dtype=fp16)
        ptr = f"*{dtype}"
        specs.append(
            {
                "name": f"pgd_step[{dtype}]",
                "fn": _pgd_step_kernel,
                "signature": {
                    "x_ptr": ptr,
                    "x_adv_ptr": ptr,
                    "grad_ptr": ptr,
                    "out_ptr": ptr,
                    "numel": "i32",
                    "eps": "fp32",
                    "alpha": "fp32",
                    "BLOCK": "constexpr",
                },
                "constexprs": {"BLOCK": BLOCK},
                "values": {"numel": 128 * 3 * 32 * 32},
                "num_warps": NUM_WARPS,
            }
        )
        specs.append(
            {
                "name": f"uniform_start[{dtype}]",
                "fn": _uniform_start_kernel,
                "signature": {
                    "x_ptr": ptr,
                    "seed_ptr": "*i64",
                    "out_ptr": ptr,
                    "numel": "i32",
                    "eps": "fp32",
                    "BLOCK": "constexpr",
                },
                "constexprs": {"BLOCK": BLOCK},
                "values": {"numel": 128 * 3 * 32 * 32},
                "num_warps": NUM_WARPS,
            }
        )
    return specs
