"""Backend selection shared by the fused ops: Triton on CUDA, native C++ on CPU when loaded, the reference otherwise.

Every op asks `select_backend` with the reasons (or None) why Triton and the native library cannot take this call.
A fallback to the reference is logged once per (op, reason) and the choice of every call is kept in `last_backend`,
so nothing falls back silently.

Compiled Triton on CUDA takes another route (`traced_triton`): the public wrappers call the ops' `triton_op`
variants (`arat::*_triton`), which torch.compile traces into, so Inductor sees the kernel launches themselves
instead of an opaque custom op. Everything else (native, reference, Triton under the interpreter) goes through the
`custom_op`s and `select_backend`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator

import torch

from . import native

log = logging.getLogger("kernels")

BACKENDS = ("triton", "native", "reference")
TRACED_TRITON_DEVICES = ("cuda",)  # where compiled Triton takes the triton_op route (tests widen it to CPU)
NO_NATIVE_KERNEL = "the native library has no kernel for this op"
_forced: str | None = None
_last: dict[str, str] = {}
_logged: set[tuple[str, str]] = set()


@functools.cache
def triton_status() -> tuple[bool, bool, str]:
    """(importable, interpreter active, detail). The interpreter is fixed when triton is first imported."""
    try:
        import triton
    except ImportError as err:  # the package is optional: pip install arat[kernels]
        return False, False, f"triton not importable ({err})"
    from . import _triton_util

    interpreted = _triton_util.interpreter_active()
    mode = "interpreter (TRITON_INTERPRET=1)" if interpreted else "compiled"
    return True, interpreted, f"triton {triton.__version__}, {mode}"


def triton_unsupported_device(device: torch.device) -> str | None:
    """Why Triton cannot run on this device (None when it can): CUDA, or CPU tensors under the interpreter."""
    importable, interpreted, detail = triton_status()
    if not importable:
        return detail
    if device.type == "cuda" or (device.type == "cpu" and interpreted):
        return None
    return f"Triton runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got {device.type}"


def native_unsupported_device(device: torch.device) -> str | None:
    """Why the native library cannot run on this device (None when it can)."""
    if not native.is_loaded():
        return "native library not loaded (build it with CMake, then kernels.load_native())"
    if device.type != "cpu":
        return f"the native library runs on CPU tensors, got {device.type}"
    return None


@contextlib.contextmanager
def force_backend(name: str | None) -> Iterator[None]:
    """Make every op use `name` (tests and benchmarks); an op that cannot honour it raises instead of falling back."""
    global _forced
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: choose one of {BACKENDS}")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def select_backend(op: str, device: torch.device, triton_reason: str | None, native_reason: str | None) -> str:
    """The backend for one call of `op`; reasons are None when that backend can take the call."""
    reasons = {"triton": triton_reason, "native": native_reason, "reference": None}
    if _forced is not None:
        if reasons[_forced] is not None:
            raise RuntimeError(f"{op}: backend {_forced!r} was forced but cannot run this call: {reasons[_forced]}")
        return record(op, _forced)
    preferred = {"cuda": "triton", "cpu": "native"}.get(device.type)
    if preferred == "native" and (not native.is_loaded() or native_reason == NO_NATIVE_KERNEL):
        return record(op, "reference")  # a configuration, not a per-call fallback: available_backends() reports it
    if preferred is not None and reasons[preferred] is not None:
        _log_once(op, f"{preferred} cannot run this call ({reasons[preferred]}); using the reference")
        return record(op, "reference")
    return record(op, preferred or "reference")


def traced_triton(device: torch.device, why_not: Callable[[], str | None]) -> bool:
    """True when this call goes to its triton_op variant: a CUDA tensor, Triton compiled (not interpreted),
    no other backend forced, and `why_not()` (the call's layout/dtype/size reason against the kernels) None.
    torch.compile traces this with the public wrapper: plain Python on values fixed for a compiled graph (guarded);
    `why_not` runs only on the route's devices, so CPU traces never reach triton. It records nothing: a dict write
    traced by Dynamo would guard on the dict's keys and recompile; the triton_op bodies record their calls."""
    if device.type not in TRACED_TRITON_DEVICES or _forced not in (None, "triton") or not triton_compiled():
        return False
    return why_not() is None


@torch.compiler.assume_constant_result
def triton_compiled() -> bool:
    """Triton importable and compiling kernels (not under TRITON_INTERPRET=1): the triton_op route's condition."""
    importable, interpreted, _ = triton_status()
    return importable and not interpreted


def last_backend() -> dict[str, str]:
    """The backend each op used on its most recent eager call. Under torch.compile, custom-op bodies still run per
    call; the triton_op route's bodies (compiled Triton on CUDA) run when a graph is traced, not per call."""
    return dict(_last)


def record(op: str, backend: str) -> str:
    _last[op] = backend
    return backend


def _log_once(op: str, message: str) -> None:
    if (op, message) not in _logged:
        _logged.add((op, message))
        log.warning("%s: %s", op, message)
