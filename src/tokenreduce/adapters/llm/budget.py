"""Budgets of a kv-cache run: how many entries a layer keeps (``keep`` of what the unreduced cache holds at
this point, or a fixed count) and the check that a budget holds what the method forces (sinks, windows, the
question)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ...methods.kv import KVMethod
from .state import Forward

__all__ = ["check_budget", "has_question", "natural_entries", "set_budget"]


def natural_entries(layer: Any, f: Forward) -> Tensor:
    """(B,) real entries an unreduced cache of this layer holds now (what ``keep`` is a fraction of)."""
    t = layer.logical_length()
    window = getattr(layer, "sliding_window", None)
    lo = 0 if window is None else max(0, t - window + 1)
    if f.mask2d is None:
        return torch.full((f.batch,), t - lo, dtype=torch.long)
    return f.mask2d[:, lo:t].sum(1).long()


def set_budget(method: KVMethod, num_layers: int, li: int, layer: Any, f: Forward) -> Tensor:
    """Budget of layer ``li`` (B,): a ratio ``keep`` is a fraction of what the unreduced cache holds at
    this point (so KV bytes follow ``keep`` during chunked prefill and decoding too); a count is fixed."""
    n = natural_entries(layer, f).to(f.cstate.prompt_end.device)
    cs = f.cstate
    budget = method.layer_budget(li, num_layers, n, cs.prompt_end - cs.question_start)
    if f.is_prefill and bool((budget >= n).any()):
        f.notes.append(f"layer {li}: a budget >= the {int(n.min())} entries of a sample: nothing evicted there")
    cs.budgets[li] = budget
    return budget


def check_budget(method: KVMethod, num_layers: int, li: int, budget: Tensor, n_forced: Tensor, n: Tensor) -> None:
    """A budget must hold the entries the method forces (sinks, windows) plus ``min_free``."""
    need = n_forced + method.min_free  # (B, H)
    short = (need > budget.view(-1, 1)) & (n > budget.view(-1, 1))
    if bool(short.any()):
        b = int(budget.view(-1, 1).expand_as(need)[short].min())
        k = int(need[short].max())
        raise ValueError(
            f"{method.name}: the budget of layer {li} is {b} entries (keep="
            f"{method.layer_keep(li, num_layers)} of {int(n.max())} entries), smaller than "
            f"{method.forced_desc() or 'the forced entries'}"
            f"{' + the question' if has_question(method) and 'question' not in method.forced_desc() else ''}"
            f" = {k} entries; accepted: a keep giving at least {k} entries per layer")


def has_question(method: KVMethod) -> bool:
    """Whether the method keeps a question (``question_len`` > 0 for some sample)."""
    ql = method.question_len
    return bool(ql if isinstance(ql, int) else any(ql))
