"""Dual (Split-)batch norm over a clean+adversarial batch (ops `arat::dual_batch_norm` and its backward)."""

from .op import dual_batch_norm
from .reference import dual_batch_norm_reference

__all__ = ["dual_batch_norm", "dual_batch_norm_reference"]
