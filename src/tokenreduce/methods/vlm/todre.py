"""ToDRE: diversity before the LLM, information migration inside it (see :class:`ToDRE`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ...core.budget import KeepLike
from ...core.criteria import divprune_order
from ...registry import register
from .base import VLM, ModelInfo, StageDecision, StageView, VlmMethod, check_layer, top_tokens

__all__ = ["ToDRE"]


@register("todre", modality="multimodal", integration=VLM,
          paper="Li et al., ToDRE: Visual Token Pruning via Diversity and Task Awareness, arXiv 2505.18757",
          equation="greedy k-center diversity before the LLM; drop visual tokens at layer L (information migration)")
@dataclass
class ToDRE(VlmMethod):
    """ToDRE (Li, Yang, Lu, "Visual Token Pruning via Diversity and Task Awareness for Efficient Large
    Vision-Language Models", arXiv:2505.18757, 2025), two stages:

    1. diversity, after the vision encoder: greedy k-center (max-min) selection of ``keep`` of each image's
       projected tokens, S_{t+1} = S_t + argmax_i min_{j in S_t} d(x_i, x_j) (cosine distance), started at
       the patch [CLS] attends most (the most isolated token if the tower has no [CLS]) -- the start token
       is this implementation's choice;
    2. task relevance ("information migration"), inside the LLM: from ``layer`` on (default: the middle
       layer) the visual tokens are dropped. With ``relevance`` = tau > 0 the drop is adaptive: only samples
       whose last token pays the visual tokens less than tau of its attention at layer-1 drop them.

    ``keep=1`` is the identity (both stages off, DESIGN.md invariant 1): stage 2 has no budget of its own,
    so it acts only together with a stage-1 reduction (``keep < 1``).
    """

    keep: KeepLike = 0.1
    layer: int | None = None
    relevance: float = 0.0
    positions: str = "compact"
    where: ClassVar[str | None] = "post"

    def setup(self, info: ModelInfo) -> None:
        super().setup(info)
        lay = self.layer if self.layer is not None else max(1, info.depth // 2)
        check_layer(lay, info.depth, "layer")
        self.stages = () if self.is_identity else (lay,)  # keep=1: no stage 2 either (identity)

    def vision_layers(self) -> dict[int, frozenset[str]]:
        return {self.info.feature_layer: frozenset({"cls"})} if self.info.has_cls else {}

    def reduce_image(self, x: Tensor, ctx: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        k = self.count(x.shape[1])
        first = ctx["cls"][self.info.feature_layer].argmax(1) if self.info.has_cls else None  # else DivPrune's start
        scores = divprune_order(x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device), first=first)
        return top_tokens(x, scores, k)

    def reduce_stage(self, view: StageView) -> StageDecision:
        drop = torch.ones(view.real.shape[0], dtype=torch.bool, device=view.real.device)
        if self.relevance > 0:
            p = view.last_query_scores(view.layer - 1)
            drop = (p * view.visual).sum(1) < self.relevance
        return StageDecision(view.visual & ~drop[:, None])
