"""The prompt scorer's own attention kernel (:func:`scorer_attention`), registered with transformers'
``AttentionInterface`` under :data:`SCORER_ATTENTION` so that the scorer's private copy of a causal LM can
switch to it (:mod:`tokenreduce.adapters.prompt.scorer`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["SCORER_ATTENTION", "register_scorer_attention", "scorer_attention"]

SCORER_ATTENTION = "tokenreduce_scorer"


def scorer_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                     dropout: float = 0.0, scaling: float | None = None, sliding_window: int | None = None,
                     block: int = 256, **kwargs: Any) -> tuple[Tensor, None]:
    """Attention for the scorer's own copy of the LM (a transformers ``AttentionInterface`` function).

    Plain matmul-softmax-matmul in the query's dtype (bf16 matmuls on CPUs that have them: torch's CPU flash
    kernel does not use them and took ~40% of a bf16 Gemma forward), grouped-query heads folded into rows
    instead of repeated, and queries in blocks of ``block`` rows that only touch the key columns their mask
    can reach (a sliding-window layer never multiplies keys outside its window). Softmax in fp32; fully
    masked rows (padding) give zeros. ``attention_mask``: boolean (True = attend, as transformers' sdpa masks)
    or additive float, (B or 1, 1, L, S); None = causal, aligned to the end of the keys (cache continuation).
    """
    B, H, L, D = query.shape
    Hk, S = key.shape[1], key.shape[2]
    r = H // Hk
    scale = D ** -0.5 if scaling is None else float(scaling)
    softcap = kwargs.get("softcap")
    q = query.reshape(B, Hk, r, L, D)  # head h uses kv head h // r (transformers' repeat_kv layout)
    out = query.new_empty(B, Hk, r, L, D)
    off = S - L
    for i in range(0, L, block):
        j = min(L, i + block)
        lo, hi = 0, off + j
        m = None
        if attention_mask is not None:
            m = attention_mask[:, :, i:j, :hi]
            reach = (m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2).any(-2).flatten(0, -2).any(0)
            nz = torch.nonzero(reach)
            if len(nz) == 0:
                out[:, :, :, i:j] = 0
                continue
            lo, hi = int(nz[0]), int(nz[-1]) + 1
            m = m[..., lo:hi]
        elif sliding_window:
            lo = max(0, off + i - int(sliding_window) + 1)
        bq = j - i
        qb = q[:, :, :, i:j].reshape(B, Hk, r * bq, D)
        s = torch.matmul(qb, key[:, :, lo:hi].transpose(-1, -2)).float().mul_(scale).view(B, Hk, r, bq, hi - lo)
        if softcap:
            s = torch.tanh(s / softcap) * softcap
        if m is not None:
            if m.dtype == torch.bool:
                s = s.masked_fill(~m[:, :, None], float("-inf"))
            else:
                s = s + m[:, :, None].float()
        else:
            qpos = torch.arange(off + i, off + j, device=s.device)[:, None]
            kpos = torch.arange(lo, hi, device=s.device)[None]
            bad = kpos > qpos
            if sliding_window:
                bad |= kpos <= qpos - int(sliding_window)
            s = s.masked_fill(bad, float("-inf"))
        pr = torch.softmax(s, dim=-1).nan_to_num_(0.0).to(value.dtype).view(B, Hk, r * bq, hi - lo)
        out[:, :, :, i:j] = torch.matmul(pr, value[:, :, lo:hi]).view(B, Hk, r, bq, D)
    return out.view(B, H, L, D).transpose(1, 2).contiguous(), None


def register_scorer_attention() -> bool:
    """Register :func:`scorer_attention` (and sdpa's boolean masks for it) with transformers; False if this
    transformers has no attention registry."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # pragma: no cover - old transformers
        return False
    AttentionInterface.register(SCORER_ATTENTION, scorer_attention)
    AttentionMaskInterface.register(SCORER_ATTENTION, sdpa_mask)
    return True

