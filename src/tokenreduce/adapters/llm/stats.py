"""Stats of a kv-cache run (:class:`KVStats`): KV bytes of the real tensors (vs what an unreduced
``DynamicCache`` holds), kept entries per layer and sample, budgets, analytic attention FLOPs of a decoded
token, and the snapshot right after the prompt; collected after every forward of the base model."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ...accounting.kv import kv_bytes
from ...methods.kv import KVMethod
from ..base import Stats
from .budget import natural_entries
from .masks import valid_entries
from .state import FilterRecord, Forward

__all__ = ["KVStats", "collect_stats", "keep_achieved"]


@dataclass
class KVStats(Stats):
    """:class:`Stats` of the last forward plus the KV-cache accounting.

    ``kept[l][b]``: real entries of layer l for sample b (mean over KV heads); ``slots[l]``: physical length
    of layer l (max over the batch); ``budgets[l][b]``: budget set at prefill (None: not limited);
    ``kv_bytes``: bytes of the key/value tensors the cache really holds (``kv_bytes_storage``: their
    storages); ``kv_bytes_unreduced``: what transformers' DynamicCache holds for the same tokens;
    ``kv_kept_fraction = kv_bytes / kv_bytes_unreduced``; ``evicted``: some entry was evicted in this forward;
    ``unreduced[l][b]``: entries an unreduced cache of layer l holds for sample b (what ``keep`` is a fraction
    of); ``prefill_*``: the same right after the prompt; ``attended[l]`` / ``attendable[l]``: entries a decoding
    query of layer l attended to / could see (TokenSelect; batch means, NaN where it did not select);
    ``filter_kept`` / ``filter_prompt``: kept prompt columns / real prompt tokens per sample (prompt filters).
    ``notes``: this forward's and, prefixed ``prompt:``, those of the prompt's forward.

    ``keep_achieved`` (the kv-cache meaning of keep, from these counts): ``sum(prefill_kept) /
    sum(prefill_unreduced)`` for methods that compress the prompt once, ``sum(kept) / sum(unreduced)`` for
    those that evict while decoding (at every step), ``sum(attended) / sum(attendable)`` for TokenSelect (1.0
    before a decoding step), ``sum(len(filter_kept[b])) / sum(filter_prompt)`` for a prompt filter.
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
    unreduced: list[list[int]] = field(default_factory=list)
    prefill_unreduced: list[list[int]] = field(default_factory=list)
    attendable: list[float] = field(default_factory=list)
    filter_kept: list[list[int]] = field(default_factory=list)  # prompt filters: kept prompt columns per sample
    filter_prompt: list[int] = field(default_factory=list)  # prompt filters: real prompt tokens per sample

    @property
    def prefill_kept_fraction(self) -> float:
        """KV bytes right after the prompt / what the unreduced cache held then."""
        return self.prefill_kv_bytes / self.prefill_kv_bytes_unreduced if self.prefill_kv_bytes_unreduced else 1.0


def collect_stats(f: Forward, method: KVMethod, name: str, config: Any, layer_types: list[str],
                  filtered: FilterRecord) -> KVStats:
    """The :class:`KVStats` after forward ``f`` (``filtered``: what the method's prompt filter did, if any)."""
    cache = f.cache
    B = f.batch
    removed = [p - len(k) for p, k in zip(filtered.prompt, filtered.kept, strict=True)] if filtered.in_generate else []
    kept, slots, budgets, unreduced, natural = _entries_per_layer(f, filtered.removed, removed)
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
    if f.unlimited:
        f.notes.append(_unlimited_note(method, f.unlimited, len(cache.layers)))
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
        attendable=[f.attendable.get(li, float("nan")) for li in range(len(kept))] if f.attended else [],
        filter_kept=filtered.kept if filtered.in_generate else [],
        filter_prompt=filtered.prompt if filtered.in_generate else [],
        unreduced=natural,
        keep=method.keep_fraction,
    )
    if f.is_prefill or (not cs.decoding and f.q_len > 1):  # after the prompt (its last chunk if chunked)
        earlier = [] if f.is_prefill else cs.prefill.get("prompt_notes", [])
        cs.prefill = {"prefill_kv_bytes": st.kv_bytes, "prefill_kv_bytes_unreduced": st.kv_bytes_unreduced,
                      "prefill_kept": kept, "prefill_unreduced": natural,
                      "prompt_notes": list(dict.fromkeys([*earlier, *(f"prompt: {n}" for n in st.notes)]))}
    else:  # what happened to the prompt stays visible while decoding
        st.notes += [n for n in cs.prefill.get("prompt_notes", []) if n not in st.notes]
    for k, v in cs.prefill.items():
        if k != "prompt_notes":
            setattr(st, k, v)
    st.keep_achieved = keep_achieved(method, st)
    return st


def keep_achieved(method: KVMethod, st: KVStats) -> float:
    """What ran, in the kv-cache meaning of keep, from the stats' own counts (see :class:`KVStats`)."""
    if method.is_identity:
        return 1.0
    if method.phase == "filter":
        return sum(map(len, st.filter_kept)) / sum(st.filter_prompt) if st.filter_prompt else 1.0
    if method.phase == "select":
        done = [(a, n) for a, n in zip(st.attended, st.attendable, strict=True) if not math.isnan(n)]  # selected
        return sum(a for a, _ in done) / sum(n for _, n in done) if done else 1.0
    kept, total = (st.prefill_kept, st.prefill_unreduced) if method.phase == "prefill" else (st.kept, st.unreduced)
    n = sum(map(sum, total))
    return sum(map(sum, kept)) / n if n else 1.0


def _unlimited_note(method: KVMethod, unlimited: dict[int, int], num_layers: int) -> str:
    """The note of a budget holding every entry of a layer (a capacity above what the layer holds)."""
    layers = sorted(unlimited)
    where = "every layer" if len(layers) == num_layers else f"layers {layers}"
    verb = "left out of attention" if method.phase == "select" else "evicted"
    return (f"{method.name}: the budget ({method.keep_desc(layers[0], num_layers)}) holds every entry of a sample "
            f"in {where} (up to {max(unlimited.values())} entries): nothing {verb} there")


def _entries_per_layer(f: Forward, removed: int, removed_real: list[int]
                       ) -> tuple[list[list[float]], list[int], list[list[int] | None], int, list[list[int]]]:
    """Per layer: real entries per sample (mean over KV heads), physical slots, budget per sample; the bytes an
    unreduced cache would hold (``removed``: prompt columns a filter removed before the cache); and the real
    entries an unreduced cache holds per layer and sample (``removed_real``: real prompt tokens a filter removed
    per sample)."""
    cache = f.cache
    kept: list[list[float]] = []
    slots: list[int] = []
    budgets: list[list[int] | None] = []
    natural: list[list[int]] = []
    bytes_unreduced = 0
    B = f.batch
    for li, layer in enumerate(cache.layers):
        nat = natural_entries(layer, f)
        if removed_real:
            window = getattr(layer, "sliding_window", None)
            nat = nat + torch.as_tensor(removed_real, device=nat.device)
            nat = nat if window is None else nat.clamp(max=window - 1)
        natural.append(nat.tolist())
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
            bytes_unreduced += B * H * n_full * D * keys.element_size() * 2
        b = f.cstate.budgets.get(li)
        budgets.append(None if b is None else b.tolist())
    return kept, slots, budgets, bytes_unreduced, natural


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
