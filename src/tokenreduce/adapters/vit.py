"""ViT adapter (integration point ``vit-layers``): places a :class:`~tokenreduce.methods.vit.VisionMethod`
inside the blocks of timm ``VisionTransformer`` and transformers ``ViTModel``/``ViTForImageClassification``/
``CLIPVisionModel``. This module only describes the families (where the blocks are, how a block splits into
its attention and MLP halves, where its q/k come from); the patching is :mod:`.blocks`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .base import Handle, Patcher, register_adapter
from .blocks import QK, BlockFamily, BlockRun, attach_blocks, hf_encoder_layers

__all__ = ["FAMILIES", "VitAdapter"]


# ---------------------------------------------------------------------------- timm
def _timm_vit_cls() -> type | None:
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # pragma: no cover - timm is a dependency
        return None
    return VisionTransformer


def _timm_matches(m: nn.Module) -> bool:
    cls = _timm_vit_cls()
    return cls is not None and isinstance(m, cls)


def _timm_blocks(m: nn.Module) -> list[nn.Module]:
    blocks = list(m.blocks)
    for i, b in enumerate(blocks):
        if not all(hasattr(b, a) for a in ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2")) or not hasattr(
                b.attn, "qkv"):
            raise TypeError(
                f"timm block {i} is a {type(b).__name__} with {type(b.attn).__name__}: tokenreduce supports timm's "
                f"pre-norm Block with a fused-qkv Attention (vit_*, deit_*)"
            )
    if getattr(m, "attn_pool", None) is not None:
        raise TypeError("timm VisionTransformer with attention pooling (global_pool='map') is not supported")
    return blocks


def _timm_grid(m: nn.Module) -> tuple[int, int] | None:
    if getattr(m.patch_embed, "dynamic_img_size", False):
        return None
    g = getattr(m.patch_embed, "grid_size", None)
    return tuple(g) if g is not None else None


def _timm_attn_half(b: nn.Module, x: Tensor, bias: Tensor | None, kw: dict) -> Tensor:
    return x + b.drop_path1(b.ls1(b.attn(b.norm1(x), attn_mask=bias)))


def _timm_mlp_half(b: nn.Module, x: Tensor) -> Tensor:
    return x + b.drop_path2(b.ls2(b.mlp(b.norm2(x))))


def _timm_qk(b: nn.Module) -> QK:
    a = b.attn
    hd = a.num_heads * a.head_dim
    return QK(a.qkv, a.qkv, slice(0, hd), slice(hd, 2 * hd), a.num_heads, a.head_dim, a.scale, a.q_norm, a.k_norm)


TIMM = BlockFamily("timm VisionTransformer (vit_*, deit_*)", _timm_matches, _timm_blocks,
                 lambda m: int(m.num_prefix_tokens), _timm_grid, _timm_attn_half, _timm_mlp_half, _timm_qk,
                 "attn_mask")


# ---------------------------------------------------------------------------- transformers ViT / CLIP vision
def _hf_vit_matches(m: nn.Module) -> bool:
    return type(m).__name__ in ("ViTModel", "ViTForImageClassification") and \
        hf_encoder_layers(m, "ViTLayer") is not None


def _hf_grid(m: nn.Module) -> tuple[int, int] | None:
    cfg = getattr(m, "config", None)
    cfg = getattr(cfg, "vision_config", cfg)
    size, patch = cfg.image_size, cfg.patch_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    patch = patch if isinstance(patch, (tuple, list)) else (patch, patch)
    return size[0] // patch[0], size[1] // patch[1]


def _hf_vit_attn_half(b: nn.Module, x: Tensor, bias: Tensor | None, kw: dict) -> Tensor:
    h, _ = b.attention(b.layernorm_before(x), bias, **kw)
    return b.dropout(h) + x


def _hf_vit_mlp_half(b: nn.Module, x: Tensor) -> Tensor:
    return b.dropout(b.mlp(b.layernorm_after(x))) + x


def _hf_vit_qk(b: nn.Module) -> QK:
    a = b.attention
    return QK(a.q_proj, a.k_proj, None, None, a.num_attention_heads, a.head_dim, a.scaling)


HF_VIT = BlockFamily("transformers ViTModel / ViTForImageClassification", _hf_vit_matches,
                   lambda m: hf_encoder_layers(m, "ViTLayer"), lambda m: 1, _hf_grid,
                   _hf_vit_attn_half, _hf_vit_mlp_half, _hf_vit_qk, "attention_mask")


def _clip_matches(m: nn.Module) -> bool:
    return type(m).__name__ in ("CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPVisionTransformer") and \
        hf_encoder_layers(m, "CLIPEncoderLayer") is not None


def _clip_attn_half(b: nn.Module, x: Tensor, bias: Tensor | None, kw: dict) -> Tensor:
    h, _ = b.self_attn(hidden_states=b.layer_norm1(x), attention_mask=bias, **kw)
    return x + h


def _clip_mlp_half(b: nn.Module, x: Tensor) -> Tensor:
    return x + b.mlp(b.layer_norm2(x))


def _clip_qk(b: nn.Module) -> QK:
    a = b.self_attn
    return QK(a.q_proj, a.k_proj, None, None, a.num_heads, a.head_dim, a.scale)


HF_CLIP = BlockFamily("transformers CLIPVisionModel", _clip_matches, lambda m: hf_encoder_layers(m, "CLIPEncoderLayer"),
                    lambda m: 1, _hf_grid, _clip_attn_half, _clip_mlp_half, _clip_qk, "attention_mask")

FAMILIES = [TIMM, HF_VIT, HF_CLIP]


class VitAdapter:
    """Adapter for the ViT families in :data:`FAMILIES` (integration point ``vit-layers``)."""

    integration = "vit-layers"

    def __init__(self, family: BlockFamily) -> None:
        self.family = family
        self.name = family.name

    def matches(self, model: nn.Module) -> bool:
        return bool(self.family.matches(model))

    def attach(self, model: nn.Module, method: Any, method_name: str) -> Handle:
        fam = self.family
        handle, run, p = attach_blocks(model, method, method_name, fam, fam.grid(model), _dims(model, fam))
        if fam is TIMM:
            _patch_timm_pool(model, run, p)
        return handle


def _dims(model: nn.Module, fam: BlockFamily) -> Any:
    """Shapes for the analytic FLOPs estimate reported in ``Handle.stats.flops`` (None if unknown)."""
    from ..accounting.flops import hf_vit_dims, timm_vit_dims

    if fam is TIMM:
        return timm_vit_dims(model)
    cfg = getattr(model, "config", None)
    if cfg is not None and all(hasattr(getattr(cfg, "vision_config", cfg), a) for a in
                               ("hidden_size", "intermediate_size", "image_size", "patch_size")):
        return hf_vit_dims(cfg, prefix_tokens=fam.protected(model))
    return None


def _patch_timm_pool(model: nn.Module, run: BlockRun, p: Patcher) -> None:
    """timm's 'avg'/'max'/'avgmax' pooling must respect padding and token sizes after reduction."""
    if model.global_pool in ("token", ""):
        return
    if model.global_pool not in ("avg", "max", "avgmax"):
        raise TypeError(f"timm global_pool={model.global_pool!r} is not supported; accepted: token, avg, max, avgmax")

    def pool(self: nn.Module, x: Tensor, pool_type: str | None = None) -> Tensor:
        pt = self.global_pool if pool_type is None else pool_type
        st = run.state
        if pt == "token" or st is None or st.x.shape[:2] != x.shape[:2]:
            return type(self).pool(self, x, pool_type)
        start = 0 if self.pool_include_prefix else self.num_prefix_tokens
        xs, w, m = x[:, start:], st.size[:, start:].to(x.dtype), st.mask[:, start:]
        avg = (xs * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True).clamp(min=1e-6)
        mx = xs.masked_fill(~m.unsqueeze(-1), torch.finfo(x.dtype).min).amax(1)
        return {"avg": avg, "max": mx, "avgmax": 0.5 * (avg + mx)}[pt]

    p.set_method(model, "pool", pool)


for _fam in FAMILIES:
    register_adapter(VitAdapter(_fam))
