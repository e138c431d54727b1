"""H2O on the KV cache: heavy hitters by accumulated attention + a recent window (see :class:`H2O`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ...core import kv as K
from ...registry import register
from .base import KV, KVContext, KVMethod

__all__ = ["H2O"]


@register("h2o", modality="language", integration=KV,
          paper="Zhang et al., H2O: Heavy-Hitter Oracle for Efficient Generative Inference of LLMs, NeurIPS 2023",
          equation="F_i = sum_t A_t[i]; keep recent + argtop F")
@dataclass
class H2O(KVMethod):
    """H2O, Heavy-Hitter Oracle (Zhang et al., NeurIPS 2023), Alg. 1.

    Per head, every entry accumulates the attention it receives from every query so far,
    ``F_i = sum_{t} A_t[i]`` (prompt queries included); the cache keeps the ``recent`` most recent entries and
    the heavy hitters ``argtop_{budget - recent} F`` among the rest, evicting after every forward.
    Paper default: half heavy hitters, half recent (``recent_ratio=0.5``). Where the recent window and the
    question (while decoding, the question is older than the recent tokens) exceed the budget, the recent
    window shrinks to what the question leaves (noted in the stats).
    """

    recent_ratio: float = 0.5
    phase: ClassVar[str] = "decode"
    stateful: ClassVar[bool] = True
    name: ClassVar[str] = "h2o"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.recent_ratio <= 1.0:
            raise ValueError(f"recent_ratio must be in [0, 1], got {self.recent_ratio!r}")

    def forced(self, ctx: KVContext) -> Tensor:
        assert ctx.budget is not None
        r = torch.round(ctx.budget.double() * self.recent_ratio).long()
        recent = ctx.recent(r)
        room = ctx.room()  # what the question leaves: recent entries outside it must fit there
        outside = recent if ctx.question is None else recent & ~ctx.question
        fits = outside.sum(-1).amax(1) <= room
        if bool(fits.all()):
            return recent
        fitted = torch.where(fits, r, room.clamp(min=0))
        self.shrink_note(ctx, "the recent window", f"{self.recent_ratio:g} of the budget", fitted, fits)
        return ctx.recent(fitted)

    def forced_desc(self) -> str:
        return f"the recent window ({self.recent_ratio:g} of the budget)"

    def score(self, ctx: KVContext) -> Tensor:
        if ctx.is_prefill or "acc" not in ctx.state:
            acc = ctx.column_sums()
        else:
            old = ctx.state["acc"]
            new = K.accumulated_attention(ctx.probs())
            acc = torch.cat([old, torch.zeros_like(new[..., old.shape[-1]:])], dim=-1) + new
        ctx.state["acc"] = acc
        return acc
