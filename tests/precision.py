"""Tolerances read from a float64 reference instead of from what one machine's fp32 kernels happened to give.

Two fp32 computations of the same quantity (dual pass vs two passes, channels-last vs contiguous) differ by their
rounding, and how far that moves a result depends on the computation and on the CPU's kernels (AVX2 and AVX-512
sum in other orders; CPU channels-last batch norm rounds ~7x more than contiguous). A deep BN network at
initialization amplifies it strongly: a ReLU input within rounding of 0 flips, and the first layers' gradients
move by up to a few %. So each quantity is computed in float64, and the conditioning is measured there: the
distance to float64 of (a) the plain fp32 path and (b) a float64 run whose input is perturbed by fp32-sized noise
(PERTURBATION). Each fp32 path must sit within SLACK times the larger of the two (with a floor) of
float64. A wrong normalization or routing is O(1) away.
"""

from __future__ import annotations

import contextlib

import torch

SLACK = 8.0
PERTURBATION = 2.0**-17  # relative input noise of the conditioning probe: ~64 fp32 ulps, the rounding that CPU
# channels-last batch norm accumulates over a ResNet-18 (measured: 1e-6 at the stem, 6e-6 at layer4)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.detach().double()
    return float((got.detach().double() - ref).norm() / ref.norm().clamp_min(1e-30))


def perturbed(x: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1234)
    return x * (1 + PERTURBATION * torch.randn(x.shape, generator=gen, dtype=x.dtype))


def assert_near_reference(
    name: str, got: torch.Tensor, plain: torch.Tensor, ref64: torch.Tensor, probe64: torch.Tensor, floor: float
) -> None:
    """`plain` within max(floor, SLACK * the perturbed float64's distance) of `ref64`, relative norm, and `got` within
    max(floor, SLACK * the larger of that distance and the plain path's): the plain path is checked against the
    conditioning alone, not against a bound its own error sets."""
    plain_err, probe_err = rel_err(plain, ref64), rel_err(probe64, ref64)
    bounds = {"plain path": max(floor, SLACK * probe_err), "fast path": max(floor, SLACK * max(plain_err, probe_err))}
    for label, value in (("plain path", plain), ("fast path", got)):
        err, bound = rel_err(value, ref64), bounds[label]
        assert err <= bound, (
            f"{name}: the {label}'s relative distance to float64 is {err:.3g} > bound {bound:.3g} (plain fp32 "
            f"path {plain_err:.3g}, perturbed float64 {probe_err:.3g}; |fast - plain| / |plain| = "
            f"{rel_err(got, plain):.3g})"
        )


@contextlib.contextmanager
def torch_threads(n: int):
    """torch at `n` threads inside, the previous count after: a CPU's summation order (so an image whose margin is
    within rounding of zero) and the C++ Inductor generates both depend on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
