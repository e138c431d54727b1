"""ToDRE: diversity before the LLM, information migration inside it (see :class:`ToDRE`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ...core.budget import Keep
from ...core.criteria import divprune_order
from ...registry import register
from .base import VLM, ModelInfo, StageDecision, StageView, VlmMethod, check_layer, image_count, top_tokens

__all__ = ["ToDRE"]


@register("todre", modality="multimodal", integration=VLM,
          paper="Li et al., ToDRE: Visual Token Pruning via Diversity and Task Awareness, arXiv 2505.18757",
          equation="greedy k-center diversity before the LLM; drop visual tokens at layer L (information migration)",
          presets={"paper": {"keep": Keep([0.1])}})
@dataclass
class ToDRE(VlmMethod):
    """ToDRE (Li, Yang, Lu, "Visual Token Pruning via Diversity and Task Awareness for Efficient Large
    Vision-Language Models", arXiv:2505.18757, 2025), two stages:

    1. diversity, after the vision encoder: greedy k-center (max-min) selection of each image's projected
       tokens, S_{t+1} = S_t + argmax_i min_{j in S_t} d(x_i, x_j) (cosine distance), started at the patch
       [CLS] attends most (the most isolated token if the tower has no [CLS]) -- the start token is this
       implementation's choice;
    2. task relevance ("information migration"), inside the LLM: from ``layer`` on (default: the middle
       layer) the visual tokens are dropped. With ``relevance`` = tau > 0 the drop is adaptive: only samples
       whose last token pays the visual tokens less than tau of its attention at layer-1 drop them.

    ``keep`` (the fraction of the visual-token work): stage 1 keeps s = keep x L / layer of each image's
    tokens, so that (s x layer) / L = keep; a keep above layer/L is unreachable (a ValueError naming the
    range; a later ``layer`` keeps more), except ``keep=1.0``, the identity (both stages off, docs/design.md
    invariant 1). ``tr.Keep(count=n)``: stage 1 keeps n tokens per image; ``tr.Keep([s])``: stage 1 keeps
    the fraction s; preset ``"paper"``: s = 0.1. With ``relevance`` > 0 the samples that keep their visual
    tokens do more work than planned (``Handle.stats.notes`` says how many).
    """

    layer: int | None = None
    relevance: float = 0.0
    positions: str = "compact"
    where: ClassVar[str | None] = "post"
    label: ClassVar[str] = "todre"
    own_terms: ClassVar[str] = "Keep([s]): the fraction of each image's visual tokens stage 1 keeps"

    def setup(self, info: ModelInfo) -> None:
        super().setup(info)
        lay = self.layer if self.layer is not None else max(1, info.depth // 2)
        check_layer(lay, info.depth, "layer")
        self._drop = lay
        self.stages = () if self.is_identity else (lay,)  # keep=1: no stage 2 either (identity)

    def stage1(self) -> float | int:
        """What stage 1 keeps of each image's tokens: a fraction, or a count (``Keep(count=n)``)."""
        if isinstance(self.keep, int):
            return self.keep
        if self.fraction is None:
            if len(self.budget.value) != 1:
                raise ValueError(f"todre: the keep schedule {self.budget!r} must have one stage (stage 1's fraction)")
            return self.budget.value[0]
        most = self._drop / self.info.depth
        if self.fraction > most + 1e-9:
            raise ValueError(f"todre: keep={self.fraction} is above the most visual-token work it can keep "
                             f"({most:.3f}: every visual token is dropped from layer {self._drop} of "
                             f"{self.info.depth}; a later layer= keeps more); accepted: keep in (0, {most:.3f}] or "
                             f"1.0 (the unreduced model)")
        return min(1.0, self.fraction / most)

    def count(self, n: int) -> int:
        s = self.stage1()
        if self.fraction is not None and round(s * n) < 1:  # say it in terms of keep, not of stage 1's share
            most = self._drop / self.info.depth
            raise ValueError(f"todre: keep={self.fraction} leaves zero of an image's {n} visual tokens in stage 1 "
                             f"(it keeps keep x {self.info.depth}/{self._drop} of them); accepted: keep >= "
                             f"{0.5 / n * most:.3g}, or tr.Keep(count=n) with n in 1..{n}")
        return image_count(s, n)

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
            kept = int((~drop & view.visual.any(1)).sum())
            if kept:
                self.note(f"todre: relevance={self.relevance}: {kept} of {drop.numel()} samples keep their visual "
                          f"tokens after layer {view.layer} (more visual-token work than keep)")
        return StageDecision(view.visual & ~drop[:, None])
