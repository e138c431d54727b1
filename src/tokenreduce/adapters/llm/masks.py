"""Masks of a compact layer, built from the logical position of every entry (``pos``): which entries are real,
which ones a query sees (causal, padding, sliding window, ragged slots) and the attention mask handed to the
model's own attention (bool for SDPA, additive for eager)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ...core import kv as K
from .state import Forward

__all__ = ["attention_mask", "layer_mask", "query_positions", "regions", "valid_entries"]


def valid_entries(pos: Tensor, mask2d: Tensor | None) -> Tensor:
    """(B, H, N) entries holding a real token: a filled slot (pos >= 0) of a column the padding mask keeps."""
    v = pos >= 0
    if mask2d is not None:
        B = pos.shape[0]
        g = mask2d.gather(1, pos.clamp(min=0).reshape(B, -1)).view_as(pos)
        v = v & g
    return v


def query_positions(layer: Any, f: Forward, device: torch.device) -> Tensor:
    """(Q,) columns of this forward's queries (the last ``q_len`` of the layer's logical length)."""
    end = layer.logical_length()
    return torch.arange(end - f.q_len, end, device=device)


def attention_mask(allowed: Tensor, per_head: bool, query: Tensor, impl: str) -> Tensor:
    """``allowed`` (B, Hkv, Q, N) as the mask of the attention implementation ``impl``: per query head if the
    layer selects per KV head (else one mask for all heads); bool for SDPA, 0 / dtype-min for eager."""
    Hq, Hkv = query.shape[1], allowed.shape[1]
    if per_head and Hkv > 1:
        allowed = allowed.repeat_interleave(Hq // Hkv, dim=1)
    else:
        allowed = allowed[:, :1]
    if impl == "eager":
        return torch.zeros(allowed.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~allowed, torch.finfo(query.dtype).min)
    return allowed


def layer_mask(layer: Any, f: Forward, query: Tensor, n_keys: int, layer_idx: int, impl: str) -> Tensor | None:
    """The attention mask of a compact layer for this forward's queries (None: one query that sees every entry,
    the attention's fastest path)."""
    pos = layer.pos
    if pos is None or pos.shape[-1] != n_keys:
        raise RuntimeError(f"tokenreduce: layer {layer_idx} holds {None if pos is None else pos.shape[-1]}"
                           f" positions for {n_keys} keys")
    valid = valid_entries(pos, f.mask2d)
    qpos = query_positions(layer, f, pos.device)
    allowed = K.visible(pos, valid, qpos, getattr(layer, "sliding_window", None))
    if f.q_len == 1 and bool(allowed.all()):
        return None  # one query that sees every entry: no mask (the attention's fastest path)
    return attention_mask(allowed, layer.per_head, query, impl)


def regions(layer: Any, f: Forward, pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """valid (real), alive (visible to the next query), question (protected) masks, (B, H, N)."""
    valid = valid_entries(pos, f.mask2d)
    alive = valid
    window = getattr(layer, "sliding_window", None)
    if window is not None:
        alive = alive & (pos > layer.logical_length() - window)
    cs = f.cstate
    question = (pos >= cs.question_start.view(-1, 1, 1)) & (pos < cs.prompt_end.view(-1, 1, 1))
    return valid, alive, question
