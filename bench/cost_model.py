"""The cost model (METHOD 9) and the figures derived from an img/s: TFLOP/s, % of a datasheet peak and of a
measured matrix-product ceiling, projected seconds per epoch and minutes per 100 epochs. Torch-free.

Used by bench/train_step.py's rows and by the GPU check (scripts/gpucheck/), which both put bench/ on sys.path.
"""

from __future__ import annotations

DATASHEET_TFLOPS = 989.0  # H100/H200 dense bf16
TRAIN_IMAGES = 50_000  # CIFAR-10 / CIFAR-100 training sets
EPOCH_IMAGES = 49_920  # 390 full batches of 128 (the recipes' batch; the last partial batch is dropped)


def forward_units(attack_steps: int) -> int:
    """Forward-pass equivalents per image and step: 2 per attack step (forward + backward) and 6 for training."""
    return 2 * attack_steps + 6


def epoch_images(batch_size: int, train_images: int = TRAIN_IMAGES) -> int:
    """Images one epoch trains on at this batch size (full batches only, as the engine's loaders: drop_last)."""
    return (train_images // batch_size) * batch_size


def derived(
    images_per_s: float,
    flops_per_image_step: float,
    ceiling_tflops: float | None,
    images_per_epoch: int = EPOCH_IMAGES,
) -> dict:
    """img/s as TFLOP/s, % of the datasheet, % of the measured matmul ceiling, s/epoch and minutes per 100 epochs."""
    tflops = images_per_s * flops_per_image_step / 1e12
    epoch_s = images_per_epoch / images_per_s if images_per_s > 0 else None
    return {
        "images_per_s": round(images_per_s, 1),
        "tflops": round(tflops, 4),
        "pct_989": round(100 * tflops / DATASHEET_TFLOPS, 2),
        "pct_ceiling": round(100 * tflops / ceiling_tflops, 2) if ceiling_tflops else None,
        "epoch_s": round(epoch_s, 2) if epoch_s else None,
        "run100_min": round(100 * epoch_s / 60, 1) if epoch_s else None,
    }
