"""DivPrune before the LLM: the max-min diverse subset of the projected visual tokens (see :class:`DivPrune`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ...core.criteria import divprune_order
from ...registry import register
from .base import VLM, VlmMethod, top_tokens

__all__ = ["DivPrune"]


@register("divprune", modality="multimodal", integration=VLM,
          paper="Alvar et al., DivPrune: Diversity-based Visual Token Pruning for LMMs, CVPR 2025",
          equation="S=argmax_{|S|=k} min_{i!=j in S} 1-cos(x_i,x_j) (greedy max-min)",
          presets={"paper": {"keep": 0.098}})
@dataclass
class DivPrune(VlmMethod):
    """DivPrune (Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal
    Models", CVPR 2025): keep the max-min diverse subset of the projected visual tokens,
    S* = argmax_{|S|=k} min_{i != j in S} (1 - cos(x_i, x_j)), solved greedily (Alg. 1; see
    :func:`tokenreduce.core.criteria.divprune_order`).

    ``keep``: the fraction of each image's tokens kept (= of the visual-token work); ``tr.Keep(count=n)``: n
    tokens per image; preset ``"paper"``: ~9.8% of the tokens (keep = 0.098)."""

    positions: str = "compact"
    where: ClassVar[str | None] = "post"
    label: ClassVar[str] = "divprune"

    def reduce_image(self, x: Tensor, ctx: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        return top_tokens(x, divprune_order(x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)),
                          self.count(x.shape[1]))
