"""The cost model (METHOD 9) and the figures derived from an img/s. Torch-free."""

from __future__ import annotations

DATASHEET_TFLOPS = 989.0  # H100/H200 dense bf16
EPOCH_IMAGES = 49_920  # 390 full batches of 128
STEPS_PER_EPOCH = 390


def forward_units(attack_steps: int) -> int:
    """Forward-pass equivalents per image and step: 2 per attack step (forward + backward) and 6 for training."""
    return 2 * attack_steps + 6


def derived(images_per_s: float, flops_per_image_step: float, ceiling_tflops: float | None) -> dict:
    """img/s as TFLOP/s, % of the datasheet, % of the measured matmul ceiling, s/epoch and minutes per 100 epochs."""
    tflops = images_per_s * flops_per_image_step / 1e12
    epoch_s = EPOCH_IMAGES / images_per_s if images_per_s > 0 else None
    return {
        "images_per_s": round(images_per_s, 1),
        "tflops": round(tflops, 2),
        "pct_989": round(100 * tflops / DATASHEET_TFLOPS, 2),
        "pct_ceiling": round(100 * tflops / ceiling_tflops, 2) if ceiling_tflops else None,
        "epoch_s": round(epoch_s, 2) if epoch_s else None,
        "run100_min": round(100 * epoch_s / 60, 1) if epoch_s else None,
    }
