"""The reference ViT: a timm :class:`~timm.models.vision_transformer.VisionTransformer` with a convolutional
patch-embedding stem."""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer

from tokenreduce.data.digits import NUM_CLASSES

from .config import STEMS, TrainConfig

__all__ = ["ConvStemPatchEmbed", "build_reference_vit"]


class ConvStemPatchEmbed(PatchEmbed):
    """timm ``PatchEmbed`` whose projection is a small convolutional stem.

    Same interface, token grid and attributes as ``PatchEmbed`` (``patch_size``,
    ``grid_size``, ``num_patches``, ...). ``proj`` is: 3x3 stride-2 convs (BatchNorm
    + ReLU; ``stem_channels``, doubling) whose strides multiply to ``patch_size``,
    ``extra_convs`` 3x3 stride-1 convs at token resolution (same width), then a 1x1
    conv to ``embed_dim``. Early convolutions make ViTs train far faster on small
    data (Xiao et al., 2021): each token then describes a local shape (receptive
    field 23 px by default) instead of a raw 4x4 patch; on this dataset a linear
    patch embedding learned far more slowly (``docs/experiments/reference_vit.md``).
    The stem costs about 6% of the reference model's FLOPs (see :meth:`flops`).
    """

    def __init__(self, *args: Any, stem_channels: int = 24, extra_convs: int = 2, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        stride = self.patch_size[0]
        if self.patch_size[0] != self.patch_size[1] or stride & (stride - 1) or stride < 2:
            raise ValueError(f"patch_size={self.patch_size} is invalid for the conv stem: need a square power of 2")
        in_chans, embed_dim = self.proj.in_channels, self.proj.out_channels
        layers: list[torch.nn.Module] = []
        ch = stem_channels
        while stride > 1:
            layers += _conv_bn_relu(in_chans, ch, stride=2)
            in_chans, stride = ch, stride // 2
            ch = ch * 2 if stride > 1 else ch
        for _ in range(extra_convs):
            layers += _conv_bn_relu(ch, ch, stride=1)
        layers.append(torch.nn.Conv2d(ch, embed_dim, 1))
        self.proj = torch.nn.Sequential(*layers)

    def flops(self) -> float:
        """Forward FLOPs (2 x multiply-adds) of the stem for one image at ``img_size``."""
        if self.img_size is None:
            raise ValueError("flops() needs a fixed img_size")
        h, w = self.img_size
        total = 0.0
        for layer in self.proj:
            if isinstance(layer, torch.nn.Conv2d):
                h, w = -(-h // layer.stride[0]), -(-w // layer.stride[1])
                k = layer.kernel_size[0] * layer.kernel_size[1]
                total += 2.0 * h * w * layer.in_channels * k * layer.out_channels
        return total


def _conv_bn_relu(cin: int, cout: int, stride: int) -> list[torch.nn.Module]:
    """3x3 conv (no bias) + BatchNorm + ReLU."""
    return [torch.nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            torch.nn.BatchNorm2d(cout), torch.nn.ReLU(inplace=True)]


def build_reference_vit(
    stem: str | None = None, stem_channels: int | None = None, stem_extra_convs: int | None = None, **overrides: Any
) -> VisionTransformer:
    """Untrained reference architecture; ``overrides`` replace VisionTransformer kwargs.

    Every default comes from :class:`TrainConfig` (64x64, patch 4 -> 257 tokens,
    conv stem, 10 classes) with ``class_token=True`` and ``global_pool="token"``.
    ``stem="conv"`` uses :class:`ConvStemPatchEmbed` (``stem_channels``,
    ``stem_extra_convs``), ``stem="patch"`` timm's linear patch embedding.
    E.g. ``build_reference_vit(embed_dim=32, depth=2, num_heads=2)`` for tests, or
    ``build_reference_vit(**config.model_kwargs())`` for a given config.

    Raises:
        ValueError: On an unknown stem or a keyword ``VisionTransformer`` does not accept.
    """
    defaults = TrainConfig().model_kwargs()
    stem = defaults.pop("stem") if stem is None else stem
    stem_channels = defaults.pop("stem_channels") if stem_channels is None else stem_channels
    stem_extra_convs = defaults.pop("stem_extra_convs") if stem_extra_convs is None else stem_extra_convs
    defaults = {k: v for k, v in defaults.items() if not k.startswith("stem")}
    if stem not in STEMS:
        raise ValueError(f"stem={stem!r} is invalid: must be one of {STEMS}")
    accepted = set(inspect.signature(VisionTransformer.__init__).parameters) - {"self", "kwargs"}
    unknown = set(overrides) - accepted
    if unknown:
        raise ValueError(f"unknown VisionTransformer arguments {sorted(unknown)}; accepted: {sorted(accepted)}")
    kwargs: dict[str, Any] = dict(defaults, num_classes=NUM_CLASSES, class_token=True, global_pool="token")
    if stem == "conv":
        kwargs["embed_layer"] = functools.partial(
            ConvStemPatchEmbed, stem_channels=stem_channels, extra_convs=stem_extra_convs
        )
    kwargs.update(overrides)
    return VisionTransformer(**kwargs)
