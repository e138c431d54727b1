"""Datasets used by tokenreduce benchmarks."""

from tokenreduce.data.digits import (
    DATASET_VERSION,
    NUM_CLASSES,
    SPLITS,
    ClutteredDigits,
    ClutteredDigitsBatch,
    ClutteredDigitsConfig,
    generate_cluttered_digits,
    make_cluttered_digits,
    patch_foreground,
    split_indices,
)

__all__ = [
    "DATASET_VERSION",
    "NUM_CLASSES",
    "SPLITS",
    "ClutteredDigits",
    "ClutteredDigitsBatch",
    "ClutteredDigitsConfig",
    "generate_cluttered_digits",
    "make_cluttered_digits",
    "patch_foreground",
    "split_indices",
]
