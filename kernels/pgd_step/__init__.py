"""Fused PGD step and uniform random start (op `arat::pgd_step`, `arat::uniform_start`)."""

from .op import pgd_step, uniform_start
from .reference import pgd_step_reference, uniform_start_reference

__all__ = ["pgd_step", "pgd_step_reference", "uniform_start", "uniform_start_reference"]
