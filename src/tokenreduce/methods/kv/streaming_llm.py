"""StreamingLLM on the KV cache: attention sinks + a rolling window (see :class:`StreamingLLM`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ...registry import register
from .base import KV, KVContext, KVMethod

__all__ = ["StreamingLLM"]


@register("streaming-llm", modality="language", integration=KV,
          paper="Xiao et al., Efficient Streaming Language Models with Attention Sinks, ICLR 2024",
          equation="KV = KV[:sinks] ++ KV[t-w+1:t], w = budget - sinks")
@dataclass
class StreamingLLM(KVMethod):
    """StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024).

    The cache keeps the first ``sinks`` tokens (attention sinks) and a rolling window of the most recent
    ones, Sec. 3.2: ``KV = KV[0:sinks] ++ KV[t-w+1 : t]``, ``w = budget - sinks``. Evicts after every forward
    (prefill included) so the cache never exceeds the budget; no scores are computed. Paper default: 4 sinks.
    Where the sinks leave no room for a window of at least one entry (a budget of 4 or less, e.g. the first
    chunk of a chunked prefill at a small keep), they shrink to half of what the question leaves (noted in the
    stats): the method degrades to a recent window instead of failing mid-generation.
    """

    sinks: int = 4
    phase: ClassVar[str] = "decode"
    shared_heads: ClassVar[bool] = True
    min_free: ClassVar[int] = 1  # a window of at least one recent token
    name: ClassVar[str] = "streaming-llm"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.sinks, bool) or not isinstance(self.sinks, int) or self.sinks < 0:
            raise ValueError(f"sinks must be an int >= 0, got {self.sinks!r}")

    def forced(self, ctx: KVContext) -> Tensor:
        sinks = ctx.first(self.sinks)[:, :1]
        if ctx.budget is None:
            return sinks
        room = ctx.room(self.min_free)  # what the question and a one-entry window leave
        fits = sinks.sum(-1)[:, 0] <= room
        if bool(fits.all()):
            return sinks
        fitted = torch.where(fits, self.sinks, ((room + self.min_free) // 2).clamp(min=0))
        self.shrink_note(ctx, "the attention sinks", self.sinks, fitted, fits)
        return ctx.first(fitted)[:, :1]

    def forced_desc(self) -> str:
        return f"sinks ({self.sinks}) + a window of at least 1"

    def score(self, ctx: KVContext) -> Tensor:
        return ctx.pos[:, :1].float()  # most recent first
