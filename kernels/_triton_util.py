"""Small helpers shared by the Triton launchers (imported only when triton is importable)."""

from __future__ import annotations

import contextlib
import functools

import torch
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
    """The smallest power of two >= n (1 for n <= 1), in plain Python: triton.next_power_of_2 and triton.cdiv are
    Triton constexpr functions, ~4 us of Python per call, and the eager launchers called them ~18 times per dual-BN
    forward + backward."""
    return 1 << (max(int(n), 1) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive ints (SymInts too), as triton.cdiv, without its call overhead (next_pow2)."""
    return (a + b - 1) // b


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
