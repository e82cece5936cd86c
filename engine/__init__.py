"""arat: a fast adversarial-training engine for AR-AT and its baselines."""

from .compile_cache import isolate_inductor_cache

isolate_inductor_cache()  # before any torch.compile of this process (see engine/compile_cache.py)
