"""Small helpers shared by the Triton launchers (imported only when triton is importable)."""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
from torch._library.triton import set_wrap_triton_enabled
from triton.runtime.interpreter import InterpretedFunction


def interpreter_active() -> bool:
    """True when triton was imported under TRITON_INTERPRET=1 (its own @jit helpers, e.g. tl.rand, are interpreted)."""
    import triton.language.random as tl_random

    return isinstance(tl_random.rand, InterpretedFunction)


def program_target(device: torch.device) -> int:
    """How many programs fill the device: 4 per SM on CUDA; a handful under the interpreter (each one is slow)."""
    if device.type != "cuda":
        return 4
    return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


if interpreter_active():  # older torch's wrap_triton rejects interpreted kernels; they only ever launch directly

    def wrap_triton(kernel):
        return kernel

else:
    from torch.library import wrap_triton  # noqa: F401  (the launchers import it from here)


@contextlib.contextmanager
def direct_launches():
    """Launches inside a custom op's body go straight to the kernel: with wrap_triton's tracing on (its default
    outside a triton_op), each would dispatch through a higher-order op and register a new kernel-table entry."""
    with set_wrap_triton_enabled(False):
        yield
