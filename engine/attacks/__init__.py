"""Attacks used in training and evaluation."""

from .pgd import is_compiled, mode, objective, pgd
from .step import pgd_step, random_start, set_step_kernel

__all__ = ["is_compiled", "mode", "objective", "pgd", "pgd_step", "random_start", "set_step_kernel"]
