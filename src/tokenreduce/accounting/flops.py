"""Analytic FLOPs of (token-reduced) pre-norm transformer encoders.

Convention: one multiply-add = 2 FLOPs, matching :class:`torch.utils.flop_counter.FlopCounterMode`.
Only matrix products are counted (linear layers, ``QK^T``, ``AV``, the patch
embedding convolution). Bias adds, layer norms, softmax, GELU, residual adds and
the token-reduction bookkeeping itself (similarity matrices, gathers, ...) are
not counted; they are O(N*d) against the O(N*d^2) and O(N^2*d) terms, i.e. a
few percent at most for ViT sizes, and FlopCounterMode does not count them either.

The FLOP ratio between the unreduced and the reduced model is the "zero-overhead
limit" of the speed-up (:func:`flops_speedup`): what the method would reach if
time were proportional to counted FLOPs and reduction were free.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BLOCK_PARTS",
    "ViTDims",
    "block_flops",
    "flops_speedup",
    "hf_vit_dims",
    "timm_vit_dims",
    "vit_flops",
]

BLOCK_PARTS: tuple[str, ...] = ("qkv", "attn", "proj", "mlp")


def block_flops(
    n_attn: float,
    n_mlp: float,
    dim: int,
    mlp_hidden: int,
    n_kv: float | None = None,
) -> dict[str, float]:
    """FLOPs of one pre-norm transformer block (per sample).

    ``n_attn``: tokens entering attention (the queries); ``n_kv``: keys/values
    (defaults to ``n_attn``); ``n_mlp``: tokens entering the MLP. Parts:

    * ``qkv``  = 2 * dim * dim * (n_q + 2 n_kv)   (Q on queries, K and V on keys/values)
    * ``attn`` = 2 * 2 * n_q * n_kv * dim         (QK^T and AV, summed over heads)
    * ``proj`` = 2 * n_q * dim * dim
    * ``mlp``  = 2 * 2 * n_mlp * dim * mlp_hidden (fc1 and fc2)

    plus ``total``. Token counts may be fractional (means over a batch), or 0-d tensors (the FLOPs stay
    differentiable in them: DiffRate's FLOPs loss).
    """
    n_q = n_attn * 1.0
    kv = n_q if n_kv is None else n_kv * 1.0
    n_m = n_mlp * 1.0
    if min(n_q, kv, n_m) < 0 or dim <= 0 or mlp_hidden <= 0:
        raise ValueError("token counts must be >= 0 and dims > 0")
    parts = {
        "qkv": 2.0 * dim * dim * (n_q + 2.0 * kv),
        "attn": 4.0 * n_q * kv * dim,
        "proj": 2.0 * n_q * dim * dim,
        "mlp": 4.0 * n_m * dim * mlp_hidden,
    }
    parts["total"] = sum(parts.values())
    return parts


def vit_flops(
    tokens_attn: Sequence[float],
    tokens_mlp: Sequence[float],
    dim: int,
    mlp_hidden: int,
    patch_embed_flops: float = 0,
    head_flops: float = 0,
    tokens_kv: Sequence[float] | None = None,
) -> dict[str, Any]:
    """FLOPs of a ViT-style encoder (per sample) from per-layer token counts.

    ``tokens_attn[l]``: mean tokens entering layer ``l``'s attention;
    ``tokens_mlp[l]``: mean tokens entering its MLP (differs from ``tokens_attn``
    when a method reduces between attention and MLP, as ToMe does);
    ``tokens_kv[l]``: keys/values if they differ from the queries (default: same).

    Returns ``{"layers": [block_flops(...) per layer], "qkv", "attn", "proj", "mlp"
    (summed over layers), "blocks", "patch_embed", "head", "total", "gflops"}``.
    """
    if len(tokens_attn) != len(tokens_mlp):
        raise ValueError(f"{len(tokens_attn)} attention vs {len(tokens_mlp)} MLP token counts")
    if tokens_kv is not None and len(tokens_kv) != len(tokens_attn):
        raise ValueError("tokens_kv must have one entry per layer")
    layers = [
        block_flops(tokens_attn[i], tokens_mlp[i], dim, mlp_hidden, None if tokens_kv is None else tokens_kv[i])
        for i in range(len(tokens_attn))
    ]
    out: dict[str, Any] = {"layers": layers}
    for part in BLOCK_PARTS:
        out[part] = sum(layer[part] for layer in layers)
    out["blocks"] = sum(layer["total"] for layer in layers)
    out["patch_embed"] = float(patch_embed_flops)
    out["head"] = float(head_flops)
    out["total"] = out["blocks"] + out["patch_embed"] + out["head"]
    out["gflops"] = out["total"] / 1e9
    return out


def flops_speedup(base: dict[str, Any] | float, reduced: dict[str, Any] | float) -> float:
    """Zero-overhead speed-up limit: ``FLOPs(base) / FLOPs(reduced)`` (dicts use ``"total"``)."""
    b = base["total"] if isinstance(base, dict) else float(base)
    r = reduced["total"] if isinstance(reduced, dict) else float(reduced)
    return b / r


@dataclass(frozen=True)
class ViTDims:
    """Shapes needed for :func:`vit_flops`; ``num_tokens`` includes prefix (CLS/register) tokens."""

    dim: int
    mlp_hidden: int
    depth: int
    num_tokens: int
    patch_embed_flops: float = 0.0
    head_flops: float = 0.0

    def flops(
        self,
        tokens_attn: Sequence[float] | None = None,
        tokens_mlp: Sequence[float] | None = None,
        tokens_kv: Sequence[float] | None = None,
    ) -> dict[str, Any]:
        """:func:`vit_flops` for this model; omitted token lists mean "unreduced"."""
        full = [float(self.num_tokens)] * self.depth
        attn = full if tokens_attn is None else list(tokens_attn)
        mlp = attn if tokens_mlp is None else list(tokens_mlp)
        if len(attn) != self.depth:
            raise ValueError(f"model has {self.depth} layers, got {len(attn)} token counts")
        return vit_flops(attn, mlp, self.dim, self.mlp_hidden, self.patch_embed_flops, self.head_flops, tokens_kv)


def _conv_patch_flops(num_patches: int, in_chans: int, patch_hw: tuple[int, int], dim: int) -> float:
    return 2.0 * num_patches * in_chans * patch_hw[0] * patch_hw[1] * dim


def _counted_flops(module: Any, model: Any) -> float:
    """FLOPs of ``module`` on one image at the model's input size, by ``torch.utils.flop_counter``."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    size = getattr(module, "img_size", None) or getattr(model.patch_embed, "img_size", None)
    chans = getattr(model, "in_chans", None) or 3
    if size is None:
        return 0.0
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    p = next(module.parameters(), None)
    x = torch.zeros(1, chans, h, w, dtype=p.dtype if p is not None else torch.float32)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(x)
    return float(counter.get_total_flops())


def timm_vit_dims(model: Any) -> ViTDims:
    """Dims of a timm ``VisionTransformer`` (and close relatives such as DeiT).

    Patch embedding: the ``patch_embed.proj`` convolution at the model's configured
    input size. Head: the final ``nn.Linear`` applied to one pooled token (0 if the
    head is an ``Identity``). Attention-pool heads (``global_pool='map'``) and
    ``fc_norm`` are not counted.
    """
    from torch import nn

    dim = int(model.embed_dim)
    mlp_hidden = int(model.blocks[0].mlp.fc1.out_features)
    depth = len(model.blocks)
    pe = model.patch_embed
    num_patches = int(pe.num_patches)
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    proj = pe.proj
    if isinstance(proj, nn.Conv2d):
        kh, kw = proj.kernel_size
        patch_flops = _conv_patch_flops(num_patches, proj.in_channels, (kh, kw), proj.out_channels)
    elif isinstance(proj, nn.Linear):
        patch_flops = 2.0 * num_patches * proj.in_features * proj.out_features
    else:  # other embeddings (e.g. a conv stem): count them once with torch's FLOP counter
        patch_flops = _counted_flops(pe, model)
    head = getattr(model, "head", None)
    head_flops = 2.0 * head.in_features * head.out_features if isinstance(head, nn.Linear) else 0.0
    return ViTDims(dim, mlp_hidden, depth, num_patches + prefix, patch_flops, head_flops)


def hf_vit_dims(config: Any, *, num_labels: int | None = None, prefix_tokens: int = 1) -> ViTDims:
    """Dims from a Hugging Face ``ViTConfig``/``CLIPVisionConfig``-like config.

    A full ``CLIPConfig`` (with ``vision_config``) is accepted too. ``prefix_tokens``:
    tokens besides the patches (1 CLS token for ViT/CLIP; pass 0 for SigLIP, which
    has none, or 1 + registers for register models); the patch embedding is counted as a conv over the configured
    ``image_size``. ``num_labels``: add a linear classification head on the CLS
    token (HF configs always carry a ``num_labels``, even for headless models, so it
    is not read from the config).
    """
    cfg = getattr(config, "vision_config", None) or config
    dim = int(cfg.hidden_size)
    mlp_hidden = int(cfg.intermediate_size)
    depth = int(cfg.num_hidden_layers)
    image = cfg.image_size
    patch = cfg.patch_size
    ih, iw = (image, image) if isinstance(image, int) else tuple(image)
    ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
    num_patches = (ih // ph) * (iw // pw)
    in_chans = int(getattr(cfg, "num_channels", 3))
    patch_flops = _conv_patch_flops(num_patches, in_chans, (ph, pw), dim)
    head_flops = 2.0 * dim * num_labels if num_labels else 0.0
    return ViTDims(dim, mlp_hidden, depth, num_patches + prefix_tokens, patch_flops, head_flops)


# ---------------------------------------------------------------------------- LLaVA-style VLMs
def _llm_layer_flops(n: float, kv: float, c: Any) -> float:
    """One decoder layer, ``n`` query tokens attending ``kv`` keys (2 FLOPs per multiply-add)."""
    d, H = c.hidden_size, c.num_attention_heads
    hd = getattr(c, "head_dim", None) or d // H
    Hkv = c.num_key_value_heads
    proj = 2 * n * d * (2 * H * hd + 2 * Hkv * hd)  # q, o + k, v
    attn = 4 * n * kv * H * hd  # QK^T and AV
    mlp = 2 * n * 3 * d * c.intermediate_size  # gate, up, down
    return proj + attn + mlp


def vlm_prefill_flops(model: Any, stats: Any | None, prompt_tokens: float, n_images: float = 1.0
                      ) -> dict[str, float]:
    """Per-sample prefill FLOPs: vision tower (+ patch embedding), projector, LLM layers (from
    ``stats.tokens_attn``, else ``prompt_tokens`` at every layer), LM head on the last token; and the decode
    FLOPs of the next token (projections + attention over each layer's cache). ``model``: a LLaVA model or
    its config."""
    cfg = getattr(model, "config", model)
    v, t = cfg.vision_config, cfg.text_config
    g = v.image_size // v.patch_size
    N = g * g + 1
    dv, iv = v.hidden_size, v.intermediate_size
    patch = 2 * g * g * 3 * v.patch_size ** 2 * dv  # CLIP's linear patch embedding
    tower = getattr(getattr(model, "model", None), "vision_tower", None)
    embed = getattr(getattr(tower, "embeddings", None), "patch_embedding", None)
    if embed is not None and hasattr(embed, "flops"):  # the small VLM's conv stem
        patch = embed.flops(v.image_size)
    vision = n_images * (patch + v.num_hidden_layers * (
        2 * N * 4 * dv * dv + 4 * N * N * dv + 4 * N * dv * iv))
    depth = t.num_hidden_layers
    tokens = list(stats.tokens_attn) if stats is not None and stats.tokens_attn else [prompt_tokens] * depth
    visual_in = stats.visual_input if stats is not None and stats.tokens_attn else None
    n_proj = (visual_in if visual_in is not None else g * g * n_images)
    projector = 2 * n_proj * (dv * t.hidden_size + t.hidden_size * t.hidden_size)
    llm = sum(_llm_layer_flops(n, n, t) for n in tokens)
    head = 2 * t.hidden_size * t.vocab_size
    decode = sum(_llm_layer_flops(1, n + 1, t) for n in tokens) + head
    total = vision + projector + llm + head
    return {"vision": vision, "projector": projector, "llm": llm, "head": head, "total": total,
            "gflops": total / 1e9, "decode_gflops": decode / 1e9}
