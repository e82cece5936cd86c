"""A small learnable synthetic dataset (for tests, smoke runs and benchmarks without real data)."""

from __future__ import annotations

import numpy as np

from .cifar import ArraySplit


def synthetic_split(num_images: int, num_classes: int, seed: int, image_seed: int | None = None) -> ArraySplit:
    """Each class is a fixed random low-frequency colour pattern (from `seed`) plus per-image noise (from
    `image_seed`): learnable, not trivial. Train and test splits share `seed` and differ in `image_seed`."""
    prototypes = np.random.default_rng(seed).uniform(0, 255, size=(num_classes, 4, 4, 3))  # coarse patterns
    prototypes = prototypes.repeat(8, axis=1).repeat(8, axis=2)  # (K, 32, 32, 3)
    rng = np.random.default_rng(seed if image_seed is None else image_seed)
    labels = rng.integers(0, num_classes, size=num_images)
    noise = rng.normal(0, 48, size=(num_images, 32, 32, 3))
    images = np.clip(prototypes[labels] * 0.6 + 50 + noise, 0, 255).astype(np.uint8)
    return ArraySplit(images, labels.astype(np.int64))
