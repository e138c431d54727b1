"""Eviction: right after a layer's attention, the method scores the layer's entries (with the exact q/k the
model computed) and the layer keeps its budget, forced entries and the question included, in positional
order. A decoding step on a compact layer evicts in place (slots emptied, refilled by the next token)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ...core import kv as K
from ...methods.kv import KVMethod
from .budget import check_budget, set_budget
from .context import entries, layer_context
from .masks import regions
from .state import Forward

__all__ = ["reduce_layer"]


def reduce_layer(method: KVMethod, num_layers: int, li: int, layer: Any, f: Forward, query: Tensor, key: Tensor,
                 value: Tensor, module: nn.Module, kwargs: dict) -> None:
    """Evict from layer ``li`` after its attention in this forward (``key``/``value``: what the attention got)."""
    keys, values, pos = entries(layer, key, value)
    if method.phase == "prefill" and not f.is_prefill:
        return
    budget, natural = set_budget(method, num_layers, li, layer, f)  # grows with the sequence (ratio) or a capacity
    valid, alive, question = regions(layer, f, pos)
    cand = alive
    question = question & cand
    n = cand.sum(-1)  # (B, H)
    if not bool((n > budget.view(-1, 1)).any()):
        if method.stateful:  # keep the method's per-entry state (H2O's sums) aligned with the entries
            ctx = layer_context(li, num_layers, layer, f, query, keys, pos, valid, module, kwargs, budget, natural,
                                question)
            method.score(ctx)
            if layer.compact:
                layer.state = dict(ctx.state)
            else:
                layer.set_entries(keys, values, pos, alive, ctx.state)
                f.cstate.compact = True
        return
    B, H, N = pos.shape
    ctx = layer_context(li, num_layers, layer, f, query, keys, pos, valid, module, kwargs, budget, natural, question)
    forced = (method.forced(ctx).expand(B, H, N) | question) & cand  # the question stays, in budget
    check_budget(method, num_layers, li, budget, forced.sum(-1), n, question.sum(-1))
    scores = method.score(ctx)
    f.notes.extend(ctx.notes)
    scores = scores.expand(B, H, N) if scores.shape[1] == 1 else scores
    counts = torch.minimum(n, budget.view(-1, 1))
    idx, ok = K.select_in_order(scores, cand, forced, counts)
    keep = torch.zeros(B, H, N, dtype=torch.long, device=pos.device).scatter_add_(2, idx, ok.long()) > 0
    if f.q_len == 1 and layer.evicts_in_place(keys):
        # a decoding step evicts in place: slots emptied, refilled by the next token (no repacking copy)
        layer.state = dict(ctx.state)
        layer.mark_dead(cand & ~keep)
    else:
        layer.set_entries(keys, values, pos, keep, ctx.state)
    layer.per_head = layer.per_head or not method.shared_heads
    f.cstate.compact = True
    f.evicted = True
