"""The 32x32 image set the diffusion models here are trained on: real handwritten digits.

Each image is one of scikit-learn's 1,797 real 8x8 handwritten digits, upscaled (x3, with a little scale
jitter, so 22-26 px) and placed at a random position on a 32x32 canvas over a faint, low-contrast texture
cropped from scikit-image's bundled photographs. It is :func:`tokenreduce.data.digits.generate_cluttered_digits`
with the config :data:`DIGITS32` (one channel, no distractor fragments), so train/val/test use disjoint base
digits and generation is deterministic in ``(split, n, seed)``. Pixels are in [-1, 1] (mean 0.5, std 0.5), the
range diffusion models are trained on. The label (0-9) is the class condition.
"""

from __future__ import annotations

import dataclasses

import torch

from ...data.digits import DATASET_VERSION, ClutteredDigitsConfig, generate_cluttered_digits

__all__ = ["DIGITS32", "IMAGE_SIZE", "NUM_CLASSES", "data_version", "digit_images"]

IMAGE_SIZE = 32
NUM_CLASSES = 10
DIGITS32 = ClutteredDigitsConfig(
    image_size=IMAGE_SIZE, channels=1, digit_scale=3.0, scale_jitter=0.1, target_intensity=(0.85, 1.0),
    n_distractors=(0, 0), background_level=(0.0, 0.1), background_amplitude=(0.01, 0.03),
)


def data_version() -> dict:
    """What determines the images (for config hashes of models trained on them)."""
    return {"dataset": DATASET_VERSION, "config": dataclasses.asdict(DIGITS32)}


def digit_images(split: str, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images (n, 1, 32, 32) float32 in [-1, 1], labels (n,) int64)`` of ``split`` ("train"/"val"/"test")."""
    batch = generate_cluttered_digits(split, n, seed=seed, config=DIGITS32)
    return batch.images.clamp_(-1.0, 1.0), batch.labels
