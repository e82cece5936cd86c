"""Whole PGD attacks (random start + every step) captured once as a CUDA graph and replayed: one launch per attack
instead of some hundred kernel launches per step (forward, backward, step), none of them waiting on Python.

`pgd` calls `AttackGraphs.run` when graphs are installed (engine.perf, perf.cuda_graphs=auto|on). Per distinct
attack (network, input shape/dtype/layout, labels, TRADES target, attack settings, BN branch, mode, autocast) the
first `warmup` calls run eagerly (compilation, cuDNN autotuning and lazy initialisation happen there; their results
are those calls' results), the next call is captured and then replayed, and every later call copies its inputs into
the graph's static buffers and replays. Every call thus executes exactly once, as it would eagerly: a train-mode
attack's running-statistics updates and the random generator advance as often as without graphs.

What makes the captured attack sound:
- random starts draw from torch's default CUDA generator, which is graph-safe: each replay reads the generator's
  current seed and offset and advances it, so every replay draws new noise and `torch.manual_seed` still repeats a
  run;
- autocast's weight-cast cache is disabled for graphed attacks (a cast cached in the graph's memory pool would be
  freed when the capture ends), in their warm-up calls too (a compiled attack's guards include the switch); the
  graph casts each weight per forward;
- the weights are read where they live: the optimizer updates them in place, so each replay sees the current ones
  (a network whose parameters are replaced by new tensors needs new graphs; `load_state_dict` copies in place);
- loaders on other threads (DALI, FFCV) keep using CUDA while the capture runs (capture_error_mode="thread_local");
- every graph shares one memory pool: attacks never run concurrently and their outputs are copied out at once.
A capture that fails anyway is logged once, and from then on every attack runs eagerly (the allocator's state after
a failed capture is not to be trusted with another one).

The capture backend is a parameter so that the bookkeeping (keys, warm-up, static buffers, copies, fallback) is
tested on a CPU with a stand-in; the CUDA capture itself runs only where CUDA exists (tests/test_cuda_graphs.py,
the GPU check).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

log = logging.getLogger("engine")

Replay = Callable[[], None]


class CudaCapture:
    """torch.cuda.CUDAGraph capture on a side stream, one memory pool for all graphs."""

    def __init__(self, device: torch.device):
        self.device = self.normalize(device)
        self.stream = torch.cuda.Stream(self.device)
        self.pool = torch.cuda.graph_pool_handle()

    def new_pool(self) -> None:
        self.pool = torch.cuda.graph_pool_handle()

    @staticmethod
    def normalize(device: torch.device) -> torch.device:
        """cuda:N (tensors report cuda:N; a bare "cuda" would never compare equal to their device)."""
        return torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())

    def still_capturing(self) -> bool:
        """Whether the capture stream is still capturing (a failed capture whose abandon could not end it): asked on
        that stream, not the caller's."""
        with torch.cuda.stream(self.stream):
            return torch.cuda.is_current_stream_capturing()

    def warm(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """An eager call on the capture stream (what torch's capture recipe asks of warm-up iterations)."""
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            out = fn()
        current.wait_stream(self.stream)
        return out

    def host_syncs(self, fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, list[str]]:
        """(fn's output, the host synchronizations torch's sync debug mode reported): a warm-up call that syncs
        would invalidate a capture, so it is never captured (best effort: not every sync is reported)."""
        previous = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                out = self.warm(fn)
            finally:
                torch.cuda.set_sync_debug_mode(previous)
        for w in caught:  # the call's other warnings go on as they would have without the recording
            if not is_sync_warning(str(w.message)):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return out, [str(w.message).splitlines()[0] for w in caught if is_sync_warning(str(w.message))]

    def capture(self, fn: Callable[[], torch.Tensor]) -> tuple[Replay, torch.Tensor]:
        """(replay, static output): records fn's kernels without running them. The stream context is outside the
        capture so the caller's stream comes back even when ending the capture raises; a capture that cannot end
        hands its pool back to the allocator (which otherwise keeps allocating into it)."""
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(self.device)
        gc.collect()  # no Python-side frees of CUDA tensors in the middle of the capture
        # the warm-up's cached blocks back to the device, as torch.cuda.graph does: the allocator does not hand
        # them to a capture's private pool, and a capture near the memory's limit failed where the attack fits
        torch.cuda.empty_cache()
        with torch.cuda.stream(self.stream):
            graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
            failure = None
            try:
                out = fn()
            except BaseException as err:
                failure = err
                raise
            finally:
                try:
                    graph.capture_end()
                except Exception:
                    self._abandon_capture()
                    if failure is None:  # else fn's own error goes on (ending reports only "a previous error")
                        raise
                finally:  # no cycle frame -> error -> traceback -> frame keeping the failed capture's tensors
                    failure = None
        return graph.replay, out

    def _abandon_capture(self) -> None:
        """A capture that cannot end hands its pool back to the allocator, and the default generator's state back
        to eager use: torch 2.11's capture_end raises before it takes the generator out of capture mode, and every
        later random draw (the eager fallback's random start first) would then fail."""
        index = self.device.index
        with contextlib.suppress(Exception):  # (torch 2.6-2.7: _cuda_endAllocateCurrentStreamToPool)
            end = getattr(torch._C, "_cuda_endAllocateToPool", None) or torch._C._cuda_endAllocateCurrentStreamToPool
            end(index, self.pool)
        with contextlib.suppress(Exception):
            torch._C._cuda_releasePool(index, self.pool)
        with contextlib.suppress(Exception):  # a fresh state with the same seed and offset, not capturing
            generator = torch.cuda.default_generators[index if index is not None else torch.cuda.current_device()]
            generator.graphsafe_set_state(generator.clone_state())


def is_sync_warning(message: str) -> bool:
    """Whether a warning is torch's report of a synchronizing operation ("called a synchronizing CUDA operation").
    Switching the mode on warns once per process that it "is a prototype feature and does not yet detect all
    synchronizing operations": not a sync (matching that kept the first attack of every run uncaptured on the H200)."""
    return "called a synchronizing" in message


@dataclass
class _Entry:
    calls: int = 0
    failed: bool = False
    replay: Replay | None = None
    inputs: tuple = ()  # static x, y, target probabilities (or None)
    output: torch.Tensor | None = None
    keep: tuple = field(default_factory=tuple)  # what the graph reads besides its inputs (the network), kept alive


class AttackGraphs:
    """The captured attacks of one run (see the module docstring)."""

    def __init__(self, capture, warmup: int = 2):
        self.capture_backend = capture
        self.warmup = warmup
        self._entries: dict[tuple, _Entry] = {}
        self.captures = 0
        self.replays = 0
        self.eager_calls = 0  # calls past their warm-up that ran eagerly (a failed capture, a host sync)
        self.broken = False  # a capture failed: the allocator and streams may be in doubt, so nothing is captured

    @property
    def device(self) -> torch.device:
        return self.capture_backend.device

    def stats(self) -> dict:
        """What the graphs did so far (epoch metrics, the GPU check): with attacks run but none captured, the
        captured path fell back to eager, which only a warning line said; `attacks` counts the distinct attacks
        seen (0: the run attacked nothing, e.g. standard training)."""
        uncapturable = sum(e.failed for e in self._entries.values())
        return {"captures": self.captures, "replays": self.replays, "eager_calls": self.eager_calls,
                "broken": self.broken, "attacks": len(self._entries), "uncapturable_attacks": uncapturable}  # fmt: skip

    def release(self) -> None:
        """Drop every captured attack (its graph, static inputs and output, the network it holds): their memory goes
        back to the allocator (empty_cache frees the pool once its blocks are), and the attacks captured next (the
        evaluation after training) get a fresh pool: one left with no graph would fail the allocator's check on
        its next capture if a tensor of it were still alive. The counts stay."""
        self._entries.clear()
        if hasattr(self.capture_backend, "new_pool"):
            self.capture_backend.new_pool()

    def applies(self, x: torch.Tensor) -> bool:
        """Whether an attack on `x` is captured (CUDA graphs take tensors on their own device only)."""
        return x.device == self.device

    def run(self, attack, model, x, y, cfg, *, bn: str, train: bool, target_probs=None, autocast=None) -> torch.Tensor:
        """`attack(model, x, y, cfg, bn=, train=, target_probs=, autocast=)`, captured and replayed."""
        key = (id(model), bn, train, dataclasses.astuple(cfg), _signature(x), _signature(y), _signature(target_probs),
               _autocast_state(autocast, x.device.type))  # fmt: skip
        entry = self._entries.setdefault(key, _Entry(keep=(model,)))
        # Every call of a graphed attack runs with autocast's weight cache off, warm-up calls too: a compiled
        # attack's guards include the cache switch, and a guard failing inside the capture would recompile there.
        uncached = _uncached(autocast, x.device.type)
        call = lambda *inputs: attack(model, *inputs[:2], cfg, bn=bn, train=train, target_probs=inputs[2],  # noqa: E731
                                      autocast=uncached)  # fmt: skip
        if self.broken or entry.failed or entry.calls < self.warmup - 1:
            self.eager_calls += entry.calls >= self.warmup  # past its warm-up: a replay that could not be
            entry.calls += 1
            return self.capture_backend.warm(lambda: call(x, y, target_probs))
        if entry.calls == self.warmup - 1:  # the last warm-up call also looks for host synchronizations
            entry.calls += 1
            out, syncs = self.capture_backend.host_syncs(lambda: call(x, y, target_probs))
            if syncs:
                entry.failed = True
                log.warning("an attack synchronizes with the host (%s): it runs eagerly, uncaptured", syncs[0])
            return out
        if entry.replay is None:
            entry.inputs = tuple(None if t is None else torch.empty_like(t).copy_(t) for t in (x, y, target_probs))
            failed = None
            try:
                entry.replay, entry.output = self.capture_backend.capture(lambda: call(*entry.inputs))
            except Exception as err:  # noqa: BLE001 - any failure means: attacks run eagerly from now on
                self.broken, entry.inputs = True, ()
                failed = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if failed is not None:  # outside the except block: the error, its traceback and the failed capture's
                log.warning("CUDA graph capture of an attack failed (%s); attacks run eagerly from now on", failed)
                # the failed capture's tensors are freed before the eager attack needs their memory (an
                # out-of-memory capture's fallback ran short of just that); not while a capture the abandon failed
                # to end is still open (empty_cache would raise there and lose the fallback)
                gc.collect()
                if not self.capture_backend.still_capturing():
                    torch.cuda.empty_cache()
                self.eager_calls += 1
                return self.capture_backend.warm(lambda: call(x, y, target_probs))
            self.captures += 1
        else:
            for static, t in zip(entry.inputs, (x, y, target_probs), strict=True):
                if static is not None:
                    static.copy_(t)
        entry.replay()
        self.replays += 1
        return entry.output.clone()


def _signature(t: torch.Tensor | None):
    return None if t is None else (tuple(t.shape), t.dtype, t.stride(), str(t.device), t.requires_grad)


def _autocast_state(autocast, device_type: str) -> tuple:
    if autocast is None:
        return ()
    with autocast():
        return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _uncached(autocast, device_type: str):
    """`autocast` with its weight-cast cache off (a cast cached during capture would live in the graph's pool)."""
    if autocast is None:
        return None

    @contextlib.contextmanager
    def context() -> Iterator[None]:
        with autocast():
            enabled, dtype = torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
            with torch.autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=False):
                yield

    return context


_active: AttackGraphs | None = None


def set_attack_graphs(graphs: AttackGraphs | None) -> None:
    """Install (None: remove) the graphs `pgd` uses for attacks on CUDA tensors."""
    global _active
    _active = graphs


def active() -> AttackGraphs | None:
    return _active


@contextlib.contextmanager
def using(graphs: AttackGraphs | None) -> Iterator[None]:
    """Attacks inside use `graphs` (None: none); the previous setting comes back afterwards."""
    previous = _active
    set_attack_graphs(graphs)
    try:
        yield
    finally:
        set_attack_graphs(previous)


def for_device(device: torch.device, reuse: AttackGraphs | None = None) -> AttackGraphs | None:
    """Graphs for attacks on `device`: CUDA only (None elsewhere); `reuse` when it serves that device already (its
    memory pool and stream then serve both, e.g. training and the evaluation after it)."""
    if device.type != "cuda":
        return None
    if reuse is not None and reuse.device == CudaCapture.normalize(device):
        return reuse
    return AttackGraphs(CudaCapture(device))
