"""Attacks used in training and evaluation."""

from .pgd import mode, objective, pgd
from .step import pgd_step, random_start, set_step_kernel

__all__ = ["mode", "objective", "pgd", "pgd_step", "random_start", "set_step_kernel"]
