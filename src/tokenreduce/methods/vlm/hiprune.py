"""HiPrune before the LLM: anchors, buffers and registers from the vision encoder's attention (see :class:`HiPrune`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from ...core import visual as V
from ...registry import register
from .base import VLM, ModelInfo, VlmMethod, require_grid, select_tokens

__all__ = ["HiPrune"]


@register("hiprune", modality="multimodal", integration=VLM,
          paper="Liu et al., HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention, 2025",
          equation="anchors=topk A_mid; buffers=4-neighbours; registers=topk A_out",
          presets={"paper": {"keep": 192 / 576}})
@dataclass
class HiPrune(VlmMethod):
    """HiPrune (Liu et al., "HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in
    Vision Encoders", 2025): anchors = top attention in a middle "object" layer, buffers = their
    4-neighbours, registers = top attention in the output layer; attention = mean over heads and queries
    (the official "global attention"); buffers are true grid neighbours (the official flat index +-1 can
    wrap across rows); see :func:`tokenreduce.core.visual.hiprune_keep`.
    ``object_layer`` (1-based, default scaled from 9 of CLIP-L's 24 layers), ``alpha`` = 0.1.

    ``keep``: the fraction of each image's tokens kept (= of the visual-token work); ``tr.Keep(count=n)``: n
    tokens per image; preset ``"paper"``: LLaVA-1.5's 192 of 576 tokens (keep = 192/576)."""

    alpha: float = 0.1
    object_layer: int | None = None
    positions: str = "compact"
    where: ClassVar[str | None] = "pre"
    label: ClassVar[str] = "hiprune"

    def setup(self, info: ModelInfo) -> None:
        super().setup(info)
        require_grid(info, "hiprune")
        ol = self.object_layer if self.object_layer is not None else max(1, round(9 * info.vision_depth / 24))
        if not 1 <= ol <= info.vision_depth:
            raise ValueError(f"object_layer={ol} is out of range: the vision tower has {info.vision_depth} layers "
                             f"(accepted 1..{info.vision_depth}, 1-based)")
        self._object = ol - 1

    def vision_layers(self) -> dict[int, frozenset[str]]:
        out = {self.info.feature_layer: frozenset({"mean"})}
        out[self._object] = out.get(self._object, frozenset()) | {"mean"}
        return out

    def reduce_image(self, x: Tensor, ctx: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        keep = V.hiprune_keep(ctx["mean"][self._object], ctx["mean"][self.info.feature_layer], self.info.grid,
                              self.count(x.shape[1]), self.alpha)
        return select_tokens(x, keep)
