"""The training-time forward of a timm ViT for the learned methods: every token stays in the sequence and a
(B, N) policy D in [0, 1] masks the attention (DynamicViT's Eq. 8, :func:`~tokenreduce.core.learned.
policy_softmax`), so hard 0/1 decisions stay differentiable. Inference needs none of this: there the methods
really remove tokens through the ViT adapter."""

from __future__ import annotations

from torch import Tensor, nn

from ....adapters.vit import TIMM
from ....core.learned import policy_softmax

__all__ = ["embed", "head", "masked_attention_half", "mlp_half"]

mlp_half = TIMM.mlp_half


def embed(model: nn.Module, images: Tensor) -> Tensor:
    """The tokens entering block 0 (patch embedding, prefix tokens, position embedding)."""
    return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))


def head(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """(logits, final normalised tokens) from the last block's output."""
    feats = model.norm(x)
    return model.forward_head(feats), feats


def masked_attention_half(block: nn.Module, x: Tensor, policy: Tensor, bias: Tensor | None = None
                          ) -> tuple[Tensor, Tensor]:
    """``x + attn(norm1(x))`` of a timm block with the attention masked by ``policy`` (B, N) (Eq. 8) and the
    additive ``bias`` (B, N) on the keys (proportional attention: log token sizes); also returns the CLS
    attention row averaged over heads (B, N)."""
    a = block.attn
    if getattr(a, "gate", None) is not None:
        raise TypeError("gated timm attention is not supported by the learned methods' training forward")
    B, N, _ = x.shape
    qkv = a.qkv(block.norm1(x)).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = a.q_norm(q), a.k_norm(k)
    logits = (q * a.scale) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias[:, None, None, :].to(logits.dtype)
    attn = policy_softmax(logits, policy)
    out = (attn @ v).transpose(1, 2).reshape(B, N, a.num_heads * a.head_dim)
    out = a.proj_drop(a.proj(a.norm(out)))
    return x + block.drop_path1(block.ls1(out)), attn[:, :, 0].mean(1)
