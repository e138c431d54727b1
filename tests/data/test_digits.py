"""Tests of the cluttered-digits dataset (fast; no trained weights needed)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tokenreduce.data.digits import (
    NUM_CLASSES,
    SPLITS,
    ClutteredDigits,
    ClutteredDigitsConfig,
    generate_cluttered_digits,
    make_cluttered_digits,
    patch_foreground,
    split_indices,
)


@pytest.fixture(scope="module")
def train_batch():
    return generate_cluttered_digits("train", 256, seed=3)


def test_shapes_dtypes_and_ranges(train_batch):
    b = train_batch
    assert b.images.shape == (256, 3, 64, 64) and b.images.dtype == torch.float32
    assert b.labels.shape == (256,) and b.labels.dtype == torch.int64
    assert b.target_masks.shape == (256, 64, 64) and b.target_masks.dtype == torch.float32
    assert b.boxes.shape == (256, 4) and b.base_indices.shape == (256,)
    assert int(b.labels.min()) >= 0 and int(b.labels.max()) < NUM_CLASSES
    assert len(torch.unique(b.labels)) == NUM_CLASSES
    # default normalisation maps [0, 1] pixels to [-1, 1]; the 3 channels are replicated
    assert float(b.images.min()) >= -1.0 and float(b.images.max()) <= 1.0
    assert torch.equal(b.images[:, 0], b.images[:, 2])
    assert torch.isfinite(b.images).all()


def test_make_cluttered_digits_matches_generator_and_image_size():
    x, y = make_cluttered_digits("val", 16, seed=5)
    b = generate_cluttered_digits("val", 16, seed=5)
    assert torch.equal(x, b.images) and torch.equal(y, b.labels)
    x32, _ = make_cluttered_digits("test", 4, seed=0, image_size=32, config=ClutteredDigitsConfig(digit_scale=2.0))
    assert x32.shape == (4, 3, 32, 32)
    x1, _ = make_cluttered_digits("test", 4, config=ClutteredDigitsConfig(channels=1))
    assert x1.shape == (4, 1, 64, 64)


def test_deterministic_for_a_seed_and_different_across_seeds_and_splits():
    a = generate_cluttered_digits("train", 64, seed=7)
    b = generate_cluttered_digits("train", 64, seed=7)
    for ta, tb in zip(a, b):
        assert torch.equal(ta, tb)
    c = generate_cluttered_digits("train", 64, seed=8)
    assert not torch.equal(a.images, c.images)
    d = generate_cluttered_digits("test", 64, seed=7)
    assert not torch.equal(a.images, d.images)


def test_labels_match_base_digits():
    from tokenreduce.data.digits import _base_digits

    images, target = _base_digits()
    # sklearn's load_digits: 1797 images, labels start 0..9 and have these class counts
    assert images.shape == (1797, 8, 8) and float(images.max()) == 1.0
    assert target[:10].tolist() == list(range(10))
    assert np.bincount(target).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    b = generate_cluttered_digits("test", 100, seed=1)
    assert np.array_equal(b.labels.numpy(), target[b.base_indices.numpy()])


def test_splits_are_disjoint_stratified_and_cover_all_digits():
    parts = {s: set(split_indices(s).tolist()) for s in SPLITS}
    assert not parts["train"] & parts["val"]
    assert not parts["train"] & parts["test"]
    assert not parts["val"] & parts["test"]
    assert len(parts["train"] | parts["val"] | parts["test"]) == 1797
    assert abs(len(parts["train"]) / 1797 - 0.7) < 0.01
    assert abs(len(parts["test"]) / 1797 - 0.2) < 0.01
    for split in SPLITS:
        b = generate_cluttered_digits(split, 300, seed=0)
        assert set(b.base_indices.tolist()) <= parts[split]


def test_balanced_classes_when_cycling_the_split():
    b = generate_cluttered_digits("val", 179, seed=0)  # val has 179 base digits: each used once
    assert len(set(b.base_indices.tolist())) == 179
    counts = torch.bincount(b.labels, minlength=NUM_CLASSES)
    assert int(counts.min()) >= 15


def test_most_patches_are_background(train_batch):
    fg = patch_foreground(train_batch.target_masks, patch_size=4)
    assert fg.shape == (256, 256)
    assert fg.any(dim=1).all(), "every image must contain its digit"
    frac_background = 1.0 - fg.float().mean().item()
    assert frac_background > 0.75
    assert (1.0 - fg.float().mean(dim=1)).min().item() > 0.6


def test_target_digit_inside_box_and_brightest(train_batch):
    b = train_batch
    for i in range(16):
        top, left, h, w = b.boxes[i].tolist()
        mask = b.target_masks[i]
        assert mask[top : top + h, left : left + w].sum() == pytest.approx(mask.sum().item())
        inside = b.images[i, 0][mask > 0.5]
        outside = b.images[i, 0][mask == 0]
        # the target is brighter than all clutter (background + dimmer distractors)
        assert inside.max() > outside.max()


def test_torch_dataset_wrapper():
    ds = ClutteredDigits("train", 10, seed=0)
    assert len(ds) == 10
    x, y = ds[3]
    assert x.shape == (3, 64, 64) and y.dtype == torch.int64


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"split": "training", "n": 4}, "split='training'.*train"),
        ({"split": "train", "n": 0}, r"n=0 .*\[1, "),
        ({"split": "train", "n": 2.5}, r"n=2.5"),
        ({"split": "train", "n": 4, "seed": -1}, "seed=-1"),
        ({"split": "train", "n": 4, "image_size": 16}, r"image_size=16 .*\[32, 128\]"),
        ({"split": "train", "n": 4, "image_size": 1000}, r"image_size=1000"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_cluttered_digits(**kwargs)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("channels", 2, "channels=2"),
        ("digit_scale", 7.5, "larger than image_size"),
        ("distractor_intensity", (0.5, 0.9), "below target_intensity"),
        ("n_distractors", (3, 1), r"n_distractors=\(3, 1\)"),
        ("split_fractions", (0.5, 0.5, 0.5), "split_fractions"),
    ],
)
def test_bad_config_raises(field, value, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(ClutteredDigitsConfig(), **{field: value})


def test_config_roundtrip_through_dict():
    c = ClutteredDigitsConfig(n_distractors=(0, 2))
    as_json_like = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(c).items()}
    assert ClutteredDigitsConfig.from_dict(as_json_like) == c


def test_patch_foreground_validates():
    with pytest.raises(ValueError, match="patch_size=5"):
        patch_foreground(torch.zeros(1, 64, 64), patch_size=5)
