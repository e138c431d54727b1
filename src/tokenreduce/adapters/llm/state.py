"""Bookkeeping of a kv-cache run: per cache (:class:`CacheState`, stored on the cache object), per forward
(:class:`Forward`, set up by :func:`begin_forward` from the base model's forward arguments) and per prompt
filter (:class:`FilterRecord`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .cache import convert_cache

__all__ = ["CacheState", "FilterRecord", "Forward", "begin_forward", "question_lengths"]

_STATE = "_tokenreduce_kv_state"


@dataclass
class CacheState:
    """Per-cache bookkeeping (stored on the cache object, so several caches do not interfere)."""

    prompt_end: Tensor | None = None  # (B,) first column after the prompt
    question_start: Tensor | None = None  # (B,) first question column
    question_len: Tensor | None = None  # (B,)
    decoding: bool = False  # a one-token forward came after the prompt (chunked prefill is over)
    first_col: Tensor | None = None  # (B,) first real column (left padding)
    budgets: dict[int, Tensor] = field(default_factory=dict)  # layer -> (B,) budget
    compact: bool = False
    select_cache: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)  # tokenselect reuse
    prefill: dict[str, Any] = field(default_factory=dict)  # stats snapshot right after the prompt


@dataclass
class Forward:
    """One forward of the base model with a cache: its 2D padding mask, size, phase and what it did."""

    cache: Any
    mask2d: Tensor | None  # (B, L) bool, L >= logical length after this forward
    q_len: int
    batch: int
    is_prefill: bool
    cstate: CacheState
    evicted: bool = False
    reduce_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    attended: dict[int, float] = field(default_factory=dict)  # layer -> entries a query attended to (batch mean)
    attendable: dict[int, float] = field(default_factory=dict)  # layer -> entries it could see (batch mean)
    unlimited: dict[int, int] = field(default_factory=dict)  # layer -> entries of a sample its budget holds whole


@dataclass
class FilterRecord:
    """What the last prompt filter (GemFilter) did, for the stats."""

    removed: int = 0  # prompt columns the last filter removed (for the unreduced KV accounting)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    kept: list[list[int]] = field(default_factory=list)  # kept prompt columns per sample
    prompt: list[int] = field(default_factory=list)  # real prompt tokens per sample before filtering
    in_generate: bool = False  # a prompt filter acts inside generate() only


def question_lengths(question_len: int | Sequence[int], batch: int, device: torch.device) -> Tensor:
    """(B,) trailing question tokens per sample from a method's ``question_len`` (an int or one per sample)."""
    ql = question_len
    qlt = torch.as_tensor([ql] * batch if isinstance(ql, int) else list(ql), dtype=torch.long, device=device)
    if qlt.numel() != batch:
        raise ValueError(f"question_len has {qlt.numel()} values but the batch has {batch} samples")
    return qlt


def begin_forward(cache: Any, mask: Any, q_len: int, batch: int, device: torch.device,
                  question_len: int | Sequence[int]) -> Forward:
    """Put the compressible layers into ``cache``, check the padding ``mask`` and record where the prompt and
    its question end (at prefill; a chunk of a chunked prefill extends the prompt; a one-token forward starts
    decoding). Returns the :class:`Forward` the attention calls of this forward share."""
    B, dev = batch, device
    convert_cache(cache)
    if mask is not None and (isinstance(mask, dict) or mask.dim() != 2):
        raise TypeError("tokenreduce kv-cache methods need a 2D padding attention_mask (batch, length) or None; "
                        f"got {'a dict' if isinstance(mask, dict) else f'a {mask.dim()}D tensor'}")
    mask2d = None if mask is None else mask.to(torch.bool)
    cstate: CacheState = getattr(cache, _STATE, None) or CacheState()
    setattr(cache, _STATE, cstate)
    past = cache.get_seq_length()
    is_prefill = past == 0
    if is_prefill:
        cstate.__init__()  # a fresh cache (or one that was reset)
        end = torch.full((B,), q_len, dtype=torch.long, device=dev)
        ql = question_len
        qlt = question_lengths(ql, B, dev)
        cstate.prompt_end, cstate.question_start, cstate.question_len = end, end - qlt, qlt
        if mask2d is not None:
            if mask2d.shape[1] < q_len:
                raise ValueError(f"attention_mask has {mask2d.shape[1]} columns for {q_len} tokens")
            real = mask2d[:, :q_len]
            cstate.first_col = torch.where(real.any(1), real.float().argmax(1), torch.zeros(B, device=dev)).long()
            n_real = real.sum(1)
            if bool((qlt > n_real).any()):
                raise ValueError(f"question_len={ql} is longer than a prompt ({int(n_real.min())} real tokens)")
        else:
            cstate.first_col = torch.zeros(B, dtype=torch.long, device=dev)
            if int(qlt.max()) > q_len:
                raise ValueError(f"question_len={ql} is longer than the prompt ({q_len} tokens)")
    else:
        if not cstate.decoding and q_len > 1 and cstate.prompt_end is not None:
            # chunked prefill: the prompt (and its question, at its end) extends to this chunk
            cstate.prompt_end = torch.full_like(cstate.prompt_end, past + q_len)
            cstate.question_start = cstate.prompt_end - cstate.question_len
        elif q_len == 1:
            cstate.decoding = True
        if cstate.compact:
            for layer in cache.layers:
                layer.to_compact()
    return Forward(cache, mask2d, q_len, B, is_prefill, cstate)
