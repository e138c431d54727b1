"""Budgets of a kv-cache run: how many entries a layer keeps (``keep`` of what the unreduced cache holds at
this point, or a fixed capacity) and the check that a budget holds what cannot shrink (the question)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ...methods.kv import KVMethod
from .state import Forward

__all__ = ["check_budget", "natural_entries", "set_budget"]


def natural_entries(layer: Any, f: Forward) -> Tensor:
    """(B,) real entries an unreduced cache of this layer holds now (what ``keep`` is a fraction of)."""
    t = layer.logical_length()
    window = getattr(layer, "sliding_window", None)
    lo = 0 if window is None else max(0, t - window + 1)
    if f.mask2d is None:
        return torch.full((f.batch,), t - lo, dtype=torch.long)
    return f.mask2d[:, lo:t].sum(1).long()


def set_budget(method: KVMethod, num_layers: int, li: int, layer: Any, f: Forward) -> tuple[Tensor, Tensor]:
    """Budget of layer ``li`` (B,) and the entries its unreduced cache holds (B,): a fraction ``keep`` is of
    what the unreduced cache holds at this point (so KV bytes follow ``keep`` during chunked prefill and decoding
    too); a count is a fixed capacity. A budget holding every entry of a sample is recorded for the stats' note."""
    n = natural_entries(layer, f).to(f.cstate.prompt_end.device)
    cs = f.cstate
    budget = method.layer_budget(li, num_layers, n, cs.prompt_end - cs.question_start)
    whole = budget >= n
    if bool(whole.any()):
        f.unlimited[li] = int(n[whole].max())
    cs.budgets[li] = budget
    return budget, n


def check_budget(method: KVMethod, num_layers: int, li: int, budget: Tensor, n_forced: Tensor, n: Tensor,
                 n_question: Tensor) -> None:
    """A budget must hold the entries the method forces plus ``min_free`` (its own forced entries shrink to fit,
    so what is left is the question, which never shrinks): ValueError naming the least keep otherwise."""
    need = n_forced + method.min_free  # (B, H)
    short = (need > budget.view(-1, 1)) & (n > budget.view(-1, 1))
    if not bool(short.any()):
        return
    b = int(budget.view(-1, 1).expand_as(need)[short].min())
    k = int(need[short].max())
    entries = int(n.max())
    q = int(n_question.max())
    what = (f"the question ({q} entries, never evicted){' + a window of 1' if method.min_free else ''}"
            if q + method.min_free >= k else f"{method.forced_desc() or 'the forced entries'} ({k} entries)")
    least = (f"keep >= {k / entries:.3g}" if isinstance(method.layer_keep(li, num_layers), float)
             else f"tr.Keep(count={k}) or more")
    raise ValueError(f"{method.name}: the budget of layer {li} is {b} entries ({method.keep_desc(li, num_layers)} of "
                     f"{entries} entries), fewer than {what}; accepted: {least} (at least {k} entries per layer)"
                     + (" or a shorter question_len" if q else ""))
