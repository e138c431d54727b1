"""Tests of the reference ViT (fast, tiny models; the trained checkpoint is optional)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from tokenreduce.data.digits import ClutteredDigitsConfig, make_cluttered_digits
from tokenreduce.models.vit import (
    ConvStemPatchEmbed,
    TrainConfig,
    build_reference_vit,
    checkpoint_dir,
    evaluate,
    load_reference_vit,
    reference_eval_set,
    train_reference_vit,
)

TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0, "stem_channels": 8, "stem_extra_convs": 1}


def _tiny_config(**overrides) -> TrainConfig:
    data = ClutteredDigitsConfig(image_size=32, digit_scale=2.0)
    base = dict(image_size=32, patch_size=8, data=data, epochs=1, samples_per_epoch=64, batch_size=32,
                val_samples=32, test_samples=32, num_threads=1, **TINY)
    base.update(overrides)
    return TrainConfig(**base)


def test_default_architecture_has_257_tokens_and_cls_pooling():
    model = build_reference_vit(depth=1)  # default width, shallow: cheap to build
    assert isinstance(model, VisionTransformer)
    assert model.patch_embed.num_patches == 256
    assert model.pos_embed.shape[1] == 257
    assert model.cls_token is not None and model.global_pool == "token"
    assert model.num_classes == 10


def test_conv_stem_keeps_the_patch_grid_and_reports_flops():
    model = build_reference_vit(depth=1)
    assert isinstance(model.patch_embed, ConvStemPatchEmbed)
    assert model.patch_embed.grid_size == (16, 16)
    # 3x3 s2 (3->24) @32x32, 3x3 s2 (24->48) @16x16, 2 x 3x3 (48->48), 1x1 (48->192), all @16x16
    expected = 2 * (32 * 32 * 3 * 9 * 24 + 16 * 16 * (24 * 9 * 48 + 2 * 48 * 9 * 48 + 48 * 192))
    assert model.patch_embed.flops() == expected
    plain = build_reference_vit(stem="patch", depth=1)
    assert isinstance(plain.patch_embed.proj, torch.nn.Conv2d) and plain.patch_embed.num_patches == 256
    with pytest.raises(ValueError, match="stem='resnet'"):
        build_reference_vit(stem="resnet")


def test_tiny_forward_shapes():
    torch.manual_seed(0)
    model = build_reference_vit(**TINY).eval()
    x, _ = make_cluttered_digits("val", 4, seed=0)
    with torch.no_grad():
        logits = model(x)
        tokens = model.forward_features(x)
    assert logits.shape == (4, 10)
    assert tokens.shape == (4, 257, 32)


def test_build_rejects_unknown_argument():
    with pytest.raises(ValueError, match="embed_dims"):
        build_reference_vit(embed_dims=8)


def test_loss_decreases_on_a_tiny_dataset():
    torch.manual_seed(0)
    model = build_reference_vit(img_size=32, patch_size=8, **TINY)
    x, y = make_cluttered_digits("train", 32, seed=0, config=ClutteredDigitsConfig(image_size=32, digit_scale=2.0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(25):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_config_hash_changes_with_config_but_not_with_threads():
    a = TrainConfig()
    assert a.config_hash() == TrainConfig().config_hash()
    assert a.config_hash() != TrainConfig(depth=7).config_hash()
    assert a.config_hash() != dataclasses.replace(a, data=ClutteredDigitsConfig(n_distractors=(0, 2))).config_hash()
    assert a.config_hash() == TrainConfig(num_threads=7).config_hash()
    assert TrainConfig.from_dict(json.loads(json.dumps(a.to_dict()))) == a


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"depth": 0}, "depth=0"),
        ({"num_heads": 5}, "num_heads=5 must divide embed_dim=192"),
        ({"patch_size": 5}, "patch_size=5"),
        ({"image_size": 32}, "data.image_size=64"),
        ({"lr": 0.0}, r"lr=0.0 is out of range"),
    ],
)
def test_bad_train_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_train_save_and_load_roundtrip(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENREDUCE_CACHE", str(tmp_path))
    config = _tiny_config()
    with pytest.raises(FileNotFoundError, match="tokenreduce train vit"):
        load_reference_vit(config=config)
    metrics = train_reference_vit(config, progress=False)
    assert 0.0 <= metrics["test_acc"] <= 1.0 and metrics["steps"] == 2
    assert checkpoint_dir(config).parent == tmp_path / "reference_vit"
    model, info = load_reference_vit(config=config)
    assert not model.training
    assert info["metrics"]["test_acc"] == metrics["test_acc"]
    x, y = reference_eval_set("test", config)
    assert evaluate(model, x, y)["acc"] == pytest.approx(metrics["test_acc"])


@pytest.mark.slow
def test_cached_reference_vit_is_accurate():
    try:
        model, info = load_reference_vit()
    except FileNotFoundError:
        pytest.skip("trained reference ViT not cached; run tokenreduce train vit")
    x, y = reference_eval_set("test", info["config"])
    n = 500
    acc = evaluate(model, x[:n], y[:n])["acc"]
    assert acc >= 0.9
