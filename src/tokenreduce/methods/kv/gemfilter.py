"""GemFilter: select the prompt with an early layer, generate on the kept tokens (see :class:`GemFilter`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ...core import kv as K
from ...core import ops
from ...registry import register
from .base import KV, QUESTION_PRESETS, KVContext, KVMethod, check_window_and_pooling

__all__ = ["GemFilter"]


@register("gemfilter", modality="language", integration=KV,
          paper="Shi et al., Discovering the Gems in Early Layers: Accelerating Long-Context LLMs with 1000x Input "
                "Token Reduction (GemFilter), 2024",
          equation="s = smooth1d(sum_h q_h^last K_h^T) at layer r; prompt' = top-k(s)", presets=QUESTION_PRESETS,
          keep_meaning="fraction of the prompt tokens kept (every layer's cache then holds only those)")
@dataclass
class GemFilter(KVMethod):
    """GemFilter (Shi, Ming, Xu, Hao, Ding, Zhang, Liang, "Discovering the Gems in Early Layers: Accelerating
    Long-Context LLMs with 1000x Input Token Reduction", arXiv:2409.17422, 2024), Alg. 1.

    ``generate()`` first runs only layers ``0..r`` on the prompt (``r`` = ``layer``, an early layer; the layers
    after it never run on the full prompt), scores every prompt token by r's attention logits of the last query
    summed over the heads, ``s = sum_h q_h^{last} K_h^T`` (raw inner products, as the reference code), smooths
    them along the sequence (``pool1d``, average, kernel 5) and keeps the ``keep`` best tokens *in their
    original order*; then the whole generation runs on those tokens alone, as a shorter prompt with contiguous
    positions (the reference code re-encodes the selected ids). Prefill costs ``(r+1)/L`` of a full-prompt
    forward plus a forward of the kept tokens; every layer's cache holds only kept tokens.

    Beyond the paper: the ``question_len`` trailing tokens and the last prompt token are always kept (the
    QA split of the other methods); ``window_size`` > 1 or ``"question"`` sums the logits of that many last
    queries (SnapKV's observation window; paper: 1). ``layer=None`` takes the last full-attention layer at or
    before 40% of the depth (the paper's LLaMA-3.1-8B setting is 13 of 32; a sliding-window layer cannot see
    the whole prompt). A plain ``model(...)`` forward is not filtered: the method acts on ``generate()``.

    ``keep`` here is the fraction of the prompt's tokens kept (``round(keep n)`` of a sample's ``n`` real
    prompt tokens; ``tr.Keep(count=k)``: ``k`` tokens), which is also the fraction of KV entries every global
    layer holds after the prompt; ``h.stats.keep_achieved`` = kept / real prompt tokens (``filter_kept``,
    ``filter_prompt``). A budget smaller than the question (+ the last prompt token) raises ValueError.

    Presets: ``"question"`` = ``window_size="question"``; ``"question-max9"`` = the question's queries, max
    pooling with kernel 9 (``bench kv``'s ``gemfilter-q-max9``, its best GemFilter variant on passcode
    retrieval).
    """

    layer: int | None = None
    window_size: int | str = 1
    kernel_size: int = 5
    pooling: str = "avgpool"
    phase: ClassVar[str] = "filter"
    shared_heads: ClassVar[bool] = True
    min_free: ClassVar[int] = 0
    name: ClassVar[str] = "gemfilter"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)
                                       or self.layer < 0):
            raise ValueError(f"layer must be an int >= 0 (the filter layer) or None, got {self.layer!r}")
        check_window_and_pooling(self)
        if self.layers is not None:
            raise ValueError("gemfilter filters the prompt once for all layers: layers= is not accepted; "
                             "use layer= for the filter layer")

    def filter_layer(self, layer_types: Sequence[str]) -> int:
        """The filter layer ``r`` for a model with these layer types ("full_attention" / "sliding_attention")."""
        n = len(layer_types)
        if self.layer is not None:
            if self.layer >= n:
                raise ValueError(f"layer={self.layer} is out of range: the model has {n} layers (0..{n - 1})")
            if layer_types[self.layer] == "sliding_attention":
                full = [i for i, t in enumerate(layer_types) if t != "sliding_attention"]
                raise ValueError(f"layer={self.layer} is a sliding-window layer and cannot see the whole prompt; "
                                 f"accepted: a full-attention layer {full}")
            return self.layer
        target = round(0.4 * (n - 1))
        full = [i for i, t in enumerate(layer_types) if t != "sliding_attention"]
        if not full:
            raise ValueError("gemfilter needs a full-attention layer to score the whole prompt; this model has "
                             "sliding-window layers only (give layer= explicitly)")
        before = [i for i in full if i <= target]
        return before[-1] if before else full[0]

    def window(self, ctx: KVContext) -> Tensor:
        """(B,) queries summed per sample: ``window_size`` or the sample's question length."""
        if self.window_size == "question":
            return ctx.question_len.clamp(min=1)
        return torch.full_like(ctx.prompt_end, int(self.window_size))

    def forced(self, ctx: KVContext) -> Tensor:
        return (ctx.prompt_tail(ctx.question_len) | ctx.prompt_tail(1))[:, :1]

    def forced_desc(self) -> str:
        return "the question + the last prompt token"

    def score(self, ctx: KVContext) -> Tensor:
        w = self.window(ctx)  # (B,)
        W = min(int(w.max().item()), ctx.num_queries)
        q = ctx.query[:, :, -W:]
        rows = ctx.qpos[-W:].view(1, -1)
        inside = rows >= (ctx.prompt_end.view(-1, 1) - w.view(-1, 1))  # (B, W) queries in the sample's window
        q = q * inside.view(inside.shape[0], 1, W, 1).to(q.dtype)
        fill = 0.0 if self.pooling == "avgpool" else float("-inf")
        s = K.gemfilter_scores(q, ctx.keys, ctx.valid[:, :1], fill=fill)
        return ops.smooth1d(s, self.kernel_size, self.pooling)
