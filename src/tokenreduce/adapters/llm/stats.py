"""Stats of a kv-cache run (:class:`KVStats`): KV bytes of the real tensors (vs what an unreduced
``DynamicCache`` holds), kept entries per layer and sample, budgets, analytic attention FLOPs of a decoded
token, and the snapshot right after the prompt; collected after every forward of the base model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ...accounting.kv import kv_bytes
from ...methods.kv import KVMethod
from ..base import Stats
from .masks import valid_entries
from .state import FilterRecord, Forward

__all__ = ["KVStats", "collect_stats"]


@dataclass
class KVStats(Stats):
    """:class:`Stats` of the last forward plus the KV-cache accounting.

    ``kept[l][b]``: real entries of layer l for sample b (mean over KV heads); ``slots[l]``: physical length
    of layer l (max over the batch); ``budgets[l][b]``: budget set at prefill (None: not limited);
    ``kv_bytes``: bytes of the key/value tensors the cache really holds (``kv_bytes_storage``: their
    storages); ``kv_bytes_unreduced``: what transformers' DynamicCache holds for the same tokens;
    ``kv_kept_fraction = kv_bytes / kv_bytes_unreduced``; ``evicted``: some entry was evicted in this forward.
    """

    kept: list[list[float]] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    budgets: list[list[int] | None] = field(default_factory=list)
    layer_types: list[str] = field(default_factory=list)
    kv_bytes: int = 0
    kv_bytes_storage: int = 0
    kv_bytes_unreduced: int = 0
    kv_kept_fraction: float = 1.0
    logical_length: int = 0
    question_entries: list[int] = field(default_factory=list)
    evicted: bool = False
    attended: list[float] = field(default_factory=list)
    prefill_kv_bytes: int = 0
    prefill_kv_bytes_unreduced: int = 0
    prefill_kept: list[list[float]] = field(default_factory=list)
    filter_kept: list[list[int]] = field(default_factory=list)  # prompt filters: kept prompt columns per sample

    @property
    def prefill_kept_fraction(self) -> float:
        """KV bytes right after the prompt / what the unreduced cache held then."""
        return self.prefill_kv_bytes / self.prefill_kv_bytes_unreduced if self.prefill_kv_bytes_unreduced else 1.0


def collect_stats(f: Forward, method: KVMethod, name: str, config: Any, layer_types: list[str],
                  filtered: FilterRecord) -> KVStats:
    """The :class:`KVStats` after forward ``f`` (``filtered``: what the method's prompt filter did, if any)."""
    cache = f.cache
    B = f.batch
    kept, slots, budgets, unreduced = _entries_per_layer(f, filtered.removed)
    by = kv_bytes(cache)
    cs = f.cstate
    qent: list[int] = []
    if cs.prompt_end is not None:
        qent = (cs.prompt_end - cs.question_start).tolist()
    if method.phase == "filter" and not method.is_identity:
        if filtered.in_generate:
            f.notes.extend(filtered.notes)
            f.reduce_seconds += filtered.seconds if f.is_prefill else 0.0
        else:
            f.notes.append(f"{method.name} filters the prompt of generate(): this forward was not filtered")
    st = KVStats(
        method=name,
        input_tokens=cache.get_seq_length() + filtered.removed,
        tokens_attn=[sum(k) / max(len(k), 1) for k in kept],
        final_tokens=[round(sum(k[b] for k in kept)) for b in range(B)] if kept else [],
        reduce_seconds=f.reduce_seconds,
        notes=list(dict.fromkeys(f.notes)),
        flops=_attention_flops(config, kept, cache),
        kept=kept,
        slots=slots,
        budgets=budgets,
        layer_types=layer_types[: len(kept)],
        kv_bytes=by["tensor"],
        kv_bytes_storage=by["storage"],
        kv_bytes_unreduced=unreduced,
        kv_kept_fraction=by["tensor"] / unreduced if unreduced else 1.0,
        logical_length=cache.get_seq_length(),
        question_entries=qent,
        evicted=f.evicted,
        attended=[f.attended.get(li, float("nan")) for li in range(len(kept))] if f.attended else [],
        filter_kept=filtered.kept if filtered.in_generate else [],
    )
    if f.is_prefill or (not cs.decoding and f.q_len > 1):  # after the prompt (its last chunk if chunked)
        cs.prefill = {"prefill_kv_bytes": st.kv_bytes, "prefill_kv_bytes_unreduced": st.kv_bytes_unreduced,
                      "prefill_kept": kept}
    for k, v in cs.prefill.items():
        setattr(st, k, v)
    return st


def _entries_per_layer(f: Forward, removed: int
                       ) -> tuple[list[list[float]], list[int], list[list[int] | None], int]:
    """Per layer: real entries per sample (mean over KV heads), physical slots, budget per sample; and the
    bytes an unreduced cache would hold (``removed``: prompt columns a filter removed before the cache)."""
    cache = f.cache
    kept: list[list[float]] = []
    slots: list[int] = []
    budgets: list[list[int] | None] = []
    unreduced = 0
    B = f.batch
    for li, layer in enumerate(cache.layers):
        seen = layer.logical_length()
        keys = layer.keys
        if keys is None or not isinstance(keys, Tensor) or keys.numel() == 0:
            kept.append([0.0] * B)
            slots.append(0)
        else:
            _, H, P, D = keys.shape
            pos = layer.pos if layer.compact else layer.dense_positions(P, B, H, keys.device)
            alive = valid_entries(pos, f.mask2d) if pos is not None else torch.zeros(B, H, P, dtype=torch.bool)
            if getattr(layer, "sliding_window", None) is not None and pos is not None:
                alive = alive & (pos > seen - layer.sliding_window)  # left the window: dropped at next update
            kept.append(alive.sum(-1).float().mean(1).tolist())
            slots.append(P)
            window = getattr(layer, "sliding_window", None)
            seen_full = seen + removed  # a prompt filter removed these columns before the cache
            n_full = seen_full if window is None else min(seen_full, window - 1)
            unreduced += B * H * n_full * D * keys.element_size() * 2
        b = f.cstate.budgets.get(li)
        budgets.append(None if b is None else b.tolist())
    return kept, slots, budgets, unreduced


def _attention_flops(config: Any, kept: list[list[float]], cache: Any) -> dict[str, float]:
    """Analytic attention FLOPs of one decoded token (QK^T and AV, 2 FLOPs per multiply-add), per sample, over
    the kept entries and over what an unreduced cache holds."""
    hq = int(config.num_attention_heads)
    hd = int(getattr(config, "head_dim", None) or config.hidden_size // hq)
    per_entry = 4.0 * hq * hd
    return {"attention_per_token": per_entry * sum(sum(k) / max(len(k), 1) for k in kept),
            "attention_per_token_unreduced": per_entry * sum(
                (layer.logical_length() if getattr(layer, "sliding_window", None) is None
                 else min(layer.logical_length(), layer.sliding_window - 1)) for layer in cache.layers)}
