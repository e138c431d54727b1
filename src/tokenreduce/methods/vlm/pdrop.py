"""PyramidDrop inside the LLM: lambda of the visual tokens survive at each stage (see :class:`PDrop`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from ...core import ops
from ...core.budget import KeepLike
from ...registry import register
from .base import VLM, ModelInfo, StageDecision, StageView, VlmMethod, increasing_layers, scaled_layers

__all__ = ["PDrop"]


@register("pdrop", modality="multimodal", integration=VLM,
          paper="Xing et al., PyramidDrop: Pyramid Visual Redundancy Reduction, CVPR 2025",
          equation="stage s keeps lambda^s visual tokens ranked by softmax(q_last k^T/sqrt d)")
@dataclass
class PDrop(VlmMethod):
    """PyramidDrop (Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid
    Visual Redundancy Reduction", CVPR 2025).

    The LLM is split into stages at layers (8, 16, 24) of 32 (scaled to the model); at the start of stage s
    the visual tokens are ranked by the attention the last instruction token pays them, computed with that
    layer's own q/k on its input, s_i = mean_h softmax(q_last k^T / sqrt(d))_i, and lambda of them survive,
    so stage s keeps lambda^s of the image tokens (paper: lambda = 0.5). Positions are re-indexed
    contiguously (official code). ``keep`` = lambda."""

    keep: KeepLike = 0.5
    layers: Sequence[int] | None = None
    positions: ClassVar[str] = "compact"

    def setup(self, info: ModelInfo) -> None:
        super().setup(info)
        layers = self.layers if self.layers is not None else scaled_layers((8, 16, 24), 32, info.depth)
        layers = increasing_layers(layers, info.depth)
        self.require_fraction("pdrop's keep is the per-stage ratio lambda")
        self.stages = layers

    def score_layer(self, stage: int) -> int:
        return self.stages[stage]

    def reduce_stage(self, view: StageView) -> StageDecision:
        s = view.last_query_scores(view.layer)
        frac = float(self.keep) ** (view.stage + 1)
        return StageDecision(ops.masked_topk(s, view.visual, view.counts(frac, view.stage == 0)))
