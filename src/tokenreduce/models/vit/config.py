"""Configuration of the reference ViT and the address of its cached checkpoint:
``cache_dir("reference_vit", "v<MODEL_VERSION>-<config hash>")`` (:func:`checkpoint_dir`), so that any
change of the config (or of the dataset generator) never loads stale weights."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from tokenreduce._paths import cache_dir
from tokenreduce.data.digits import DATASET_VERSION, ClutteredDigitsConfig

from ...core.errors import check_int
from ..checkpoint import JsonFields, StoredConfig, short_hash

__all__ = ["MODEL_VERSION", "STEMS", "TrainConfig", "checkpoint_dir"]

#: Bump when the training code changes in a way that changes the weights.
MODEL_VERSION = 1
#: Patch-embedding variants: a timm ``PatchEmbed`` (linear patches) or the conv stem.
STEMS = ("conv", "patch")


@dataclass(frozen=True)
class TrainConfig(StoredConfig):
    """Architecture, data and optimisation settings of the reference ViT.

    Architecture: ``image_size``/``patch_size`` (257 tokens by default), ``embed_dim``,
    ``depth``, ``num_heads``, ``mlp_ratio``, ``drop_path_rate``; ``stem`` ("conv":
    :class:`~tokenreduce.models.vit.model.ConvStemPatchEmbed` with ``stem_channels``/``stem_extra_convs``, or
    "patch": timm's linear patch embedding).
    Data: ``data`` (generator config; its ``image_size`` must equal ``image_size``),
    ``epochs`` x ``samples_per_epoch`` freshly generated training images (new random
    placements and clutter every epoch), ``val_samples``/``test_samples`` fixed
    held-out images drawn with ``eval_seed``.
    Optimisation: AdamW (``lr``, ``weight_decay``; no decay on norms, biases,
    position embedding and CLS token), linear warmup over ``warmup_fraction`` of the
    steps then cosine decay to ``lr * min_lr_ratio``, ``label_smoothing``,
    gradient clipping at ``grad_clip``. ``seed`` seeds init and training data.
    ``num_threads`` and ``eval_batch_size`` only affect speed.

    Width: DeiT-Tiny's 192 with its 3 heads of 64, so a reducer's overhead is measured against blocks as
    costly, relative to its work, as in a ViT in use; 6 blocks instead of 12 and six epochs, for CPU
    training time (``docs/experiments/reference_vit.md``).
    """

    image_size: int = 64
    patch_size: int = 4
    embed_dim: int = 192
    depth: int = 6
    num_heads: int = 3
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    stem: str = "conv"
    stem_channels: int = 24
    stem_extra_convs: int = 2
    data: ClutteredDigitsConfig = field(default_factory=ClutteredDigitsConfig)
    epochs: int = 6
    samples_per_epoch: int = 4096
    batch_size: int = 32
    lr: float = 1e-3
    min_lr_ratio: float = 0.01
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    label_smoothing: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    val_samples: int = 1000
    test_samples: int = 2000
    eval_seed: int = 12345
    num_threads: int = 2
    eval_batch_size: int = 250

    # fields that do not change the learned weights and are left out of the config hash
    _HASH_EXCLUDED: ClassVar[frozenset[str]] = frozenset({"num_threads", "eval_batch_size"})
    _JSON_FIELDS: ClassVar[JsonFields] = {"data": (dict, ClutteredDigitsConfig.from_dict)}

    def __post_init__(self) -> None:
        _validate_train_config(self)

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`~tokenreduce.models.vit.model.build_reference_vit` for this config."""
        return {
            "img_size": self.image_size,
            "patch_size": self.patch_size,
            "in_chans": self.data.channels,
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio,
            "drop_path_rate": self.drop_path_rate,
            "stem": self.stem,
            "stem_channels": self.stem_channels,
            "stem_extra_convs": self.stem_extra_convs,
        }

    def config_hash(self) -> str:
        """Short stable hash of everything that determines the trained weights."""
        payload = self.hash_payload()
        payload["_versions"] = {"model": MODEL_VERSION, "dataset": DATASET_VERSION}
        return short_hash(payload, compact=True)


def check_positive_ints(c: Any, names: tuple[str, ...]) -> None:
    """Raise ``ValueError`` naming the first field of ``c`` in ``names`` that is not an int >= 1."""
    for name in names:
        check_int(name, getattr(c, name))


def _validate_train_config(c: TrainConfig) -> None:
    """Raise ``ValueError`` naming the first invalid field of ``c``."""
    positive_ints = ("patch_size", "embed_dim", "depth", "num_heads", "stem_channels", "epochs",
                     "samples_per_epoch", "batch_size", "val_samples", "test_samples", "num_threads",
                     "eval_batch_size")
    check_positive_ints(c, positive_ints)
    if isinstance(c.stem_extra_convs, bool) or not isinstance(c.stem_extra_convs, int) or c.stem_extra_convs < 0:
        raise ValueError(f"stem_extra_convs={c.stem_extra_convs!r} is invalid: must be an int >= 0")
    if c.stem not in STEMS:
        raise ValueError(f"stem={c.stem!r} is invalid: must be one of {STEMS}")
    if c.image_size != c.data.image_size:
        raise ValueError(f"image_size={c.image_size} must equal data.image_size={c.data.image_size}")
    if c.image_size % c.patch_size:
        raise ValueError(f"patch_size={c.patch_size} must divide image_size={c.image_size}")
    if c.embed_dim % c.num_heads:
        raise ValueError(f"num_heads={c.num_heads} must divide embed_dim={c.embed_dim}")
    checks = {
        "mlp_ratio": (c.mlp_ratio, 0.0, 64.0, False),
        "drop_path_rate": (c.drop_path_rate, 0.0, 1.0, True),
        "lr": (c.lr, 0.0, 1.0, False),
        "min_lr_ratio": (c.min_lr_ratio, 0.0, 1.0, True),
        "weight_decay": (c.weight_decay, 0.0, 10.0, True),
        "warmup_fraction": (c.warmup_fraction, 0.0, 1.0, True),
        "label_smoothing": (c.label_smoothing, 0.0, 1.0, True),
        "grad_clip": (c.grad_clip, 0.0, math.inf, False),
    }
    for name, (value, lo, hi, lo_inclusive) in checks.items():
        ok = (lo <= value if lo_inclusive else lo < value) and value <= hi
        if not ok:
            bracket = "[" if lo_inclusive else "("
            raise ValueError(f"{name}={value!r} is out of range: must be in {bracket}{lo}, {hi}]")
    if c.seed < 0 or c.eval_seed < 0:
        raise ValueError(f"seed={c.seed!r} and eval_seed={c.eval_seed!r} must be non-negative ints")


def checkpoint_dir(config: TrainConfig | None = None) -> Path:
    """Cache directory of the checkpoint of ``config`` (created if missing)."""
    config = config or TrainConfig()
    return cache_dir("reference_vit", f"v{MODEL_VERSION}-{config.config_hash()}")
