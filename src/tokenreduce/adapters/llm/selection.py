"""Per-query selection (phase ``"select"``, TokenSelect): the cache is kept whole and each decoding forward
attends to the forced entries plus the top entries by the method's score, the middle selection reused while
the query barely moves (Wu et al. 2025, Sec. 3.4)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ...core import kv as K
from ...methods.kv import KVMethod
from .budget import check_budget, set_budget
from .context import entries, layer_context
from .masks import attention_mask, query_positions, regions
from .state import Forward

__all__ = ["select_entries"]


def select_entries(method: KVMethod, num_layers: int, impl: str, li: int, layer: Any, f: Forward, query: Tensor,
                   key: Tensor, value: Tensor, mask: Any, module: nn.Module, kwargs: dict
                   ) -> tuple[Tensor, Tensor, Any]:
    """The (keys, values, attention mask) layer ``li`` attends to in this decoding forward (the given ones when
    the budget holds every visible entry)."""
    keys, values, pos = entries(layer, key, value)
    budget, natural = set_budget(method, num_layers, li, layer, f)
    _, alive, question = regions(layer, f, pos)
    qpos = query_positions(layer, f, pos.device)
    alive = alive & (pos <= qpos[0])  # entries visible to this forward's first query
    question = question[:, :1] & alive[:, :1]
    n = alive[:, 0].sum(-1)
    f.attendable[li] = float(n.float().mean())
    if not bool((n > budget).any()):
        f.attended[li] = float(n.float().mean())
        return key, value, mask
    ctx = layer_context(li, num_layers, layer, f, query, keys, pos[:, :1], alive[:, :1], module, kwargs, budget,
                        natural, question)
    forced = (method.forced(ctx)[:, :1] | question) & alive[:, :1]
    f.notes.extend(ctx.notes)
    check_budget(method, num_layers, li, budget, forced.sum(-1), n.view(-1, 1), question.sum(-1))
    middle = alive[:, :1] & ~forced
    n_mid = torch.clamp(budget - forced.sum(-1)[:, 0], min=0)  # (B,)
    chosen = _middle(method.reuse_threshold, li, f, query, keys, pos, middle, n_mid)  # type: ignore[attr-defined]
    keep = (chosen | forced)  # (B, 1, N)
    B, H, N = pos.shape
    counts = keep.sum(-1)
    P = int(counts.max())
    ar = torch.arange(N, device=pos.device)
    order = torch.where(keep, ar, ar + N).argsort(dim=-1)[..., :P]  # (B, 1, P)
    ok = keep.gather(2, order)
    D = keys.shape[-1]
    o = order.expand(B, H, P)
    k_sel = keys.gather(2, o.unsqueeze(-1).expand(B, H, P, D))
    v_sel = values.gather(2, o.unsqueeze(-1).expand(B, H, P, values.shape[-1]))
    p_sel = torch.where(ok, pos[:, :1].gather(2, order), torch.full_like(order, -1))  # (B, 1, P)
    allowed = K.visible(p_sel, ok, qpos, getattr(layer, "sliding_window", None))
    f.attended[li] = float(counts.float().mean())
    return k_sel, v_sel, attention_mask(allowed, False, query, impl)


def _middle(reuse_threshold: float | None, li: int, f: Forward, query: Tensor, keys: Tensor, pos: Tensor,
            middle: Tensor, n_mid: Tensor) -> Tensor:
    """(B, 1, N) the ``n_mid`` (B,) top ``middle`` entries by the head soft vote, or, per sample, the previous
    forward's selection when the cosine similarity of the queries exceeds ``reuse_threshold``."""
    B, _, N = pos.shape
    qvec = query.float().mean(dim=2).reshape(B, -1)
    # selection cache (per sample): reuse the previous middle selection if the query barely moved
    reuse = torch.zeros(B, dtype=torch.bool, device=pos.device)
    prev = f.cstate.select_cache.get(li)
    if reuse_threshold is not None and prev is not None and prev[0].shape == qvec.shape:
        reuse = torch.nn.functional.cosine_similarity(qvec, prev[0], dim=-1) > reuse_threshold
    if bool(reuse.all()):
        assert prev is not None
        return _previous(pos, prev[1], middle)
    scores = K.head_soft_vote(query, keys, middle)
    idx, ok = K.select_in_order(scores, middle, torch.zeros_like(middle), n_mid.view(-1, 1))
    chosen = torch.zeros(B, 1, N, dtype=torch.long, device=pos.device).scatter_add_(2, idx, ok.long()) > 0
    sel = torch.where(ok[:, 0], pos[:, 0].gather(1, idx[:, 0]), torch.full_like(idx[:, 0], -1))
    if bool(reuse.any()):
        assert prev is not None
        chosen = torch.where(reuse.view(B, 1, 1), _previous(pos, prev[1], middle), chosen)
        width = max(sel.shape[1], prev[1].shape[1])
        sel = torch.nn.functional.pad(sel, (0, width - sel.shape[1]), value=-1)
        old_sel = torch.nn.functional.pad(prev[1], (0, width - prev[1].shape[1]), value=-1)
        sel = torch.where(reuse.view(B, 1), old_sel, sel)
        qvec = torch.where(reuse.view(B, 1), prev[0], qvec)
    f.cstate.select_cache[li] = (qvec, sel)
    return chosen


def _previous(pos: Tensor, sel: Tensor, middle: Tensor) -> Tensor:
    """(B, 1, N) the ``middle`` entries at the positions ``sel`` (B, K) a previous forward selected (-1: none)."""
    return (pos[:, :1].unsqueeze(-1) == sel.view(pos.shape[0], 1, 1, -1)).any(-1) & middle
