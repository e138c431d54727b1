"""What a method sees of one layer: the entries of this forward (cache + new keys, with their positions) and
the :class:`~tokenreduce.methods.kv.KVContext` built from them."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ...methods.kv import KVContext
from .masks import query_positions
from .state import Forward

__all__ = ["entries", "layer_context"]


def entries(layer: Any, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """All entries this forward sees, with positions: (keys, values, pos)."""
    if layer.compact:
        return layer.keys, layer.values, layer.pos
    B, H, N, _ = key.shape
    return key, value, layer.dense_positions(N, B, H, key.device)


def layer_context(li: int, num_layers: int, layer: Any, f: Forward, query: Tensor, keys: Tensor, pos: Tensor,
                  valid: Tensor, module: nn.Module, kwargs: dict, budget: Tensor, natural: Tensor,
                  question: Tensor) -> KVContext:
    """The :class:`KVContext` of layer ``li`` in this forward (``kwargs``: the attention call's, for the scaling
    and softcap the model uses; ``budget``/``natural`` (B,) from :func:`~.budget.set_budget`, ``question``
    (B, H, N) the question entries held)."""
    cs = f.cstate
    rel = pos - cs.first_col.view(-1, 1, 1)
    return KVContext(query=query, keys=keys, pos=pos, valid=valid, qpos=query_positions(layer, f, pos.device),
                     rel=rel, prompt_end=cs.prompt_end, question_start=cs.question_start,
                     scaling=float(kwargs.get("scaling") or module.scaling), layer=li, num_layers=num_layers,
                     window=getattr(layer, "sliding_window", None), softcap=kwargs.get("softcap"),
                     is_prefill=f.is_prefill, state=dict(layer.state), budget=budget, natural=natural,
                     question=question)
