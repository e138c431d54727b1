"""Small tensor helpers of the VLM adapter: additive 4D attention masks, the causal mask of a padded batch,
the last real token, and the order that packs kept tokens to one end of a padded batch."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["causal_allowed", "last_real", "mask4d", "packed_order"]


def _neg(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).min if dtype.is_floating_point else torch.finfo(torch.float32).min


def mask4d(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, Q, K) bool -> additive (B, 1, Q, K) mask in ``dtype`` (works for eager and SDPA)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, _neg(dtype))[:, None]


def causal_allowed(real: Tensor) -> Tensor:
    """(B, L) real-token mask -> (B, L, L) causal & padding mask in the current order."""
    L = real.shape[1]
    tri = torch.ones(L, L, dtype=torch.bool, device=real.device).tril()
    return tri[None] & real[:, None, :]


def last_real(real: Tensor) -> Tensor:
    """(B,) index of the last real token of each row of ``real`` (B, L)."""
    return (torch.arange(real.shape[1], device=real.device)[None] * real).argmax(1)


def packed_order(valid: Tensor, key: Tensor, pad_left: bool) -> Tensor:
    """Indices (B, K) that put the ``valid`` (B, N) entries in ``key`` order (stable; keys in [0, N + 10))
    at the right end of each row (``pad_left``) or at its left end; K = the largest count. The other slots
    point at entries that are not valid (mask them with ``valid.gather(1, order)``)."""
    N = valid.shape[1]
    K = int(valid.sum(1).max())
    big = N + 10
    order = torch.argsort(torch.where(valid, key, -big if pad_left else big), dim=1, stable=True)
    return order[:, N - K:] if pad_left else order[:, :K]
