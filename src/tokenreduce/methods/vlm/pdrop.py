"""PyramidDrop inside the LLM: lambda of the visual tokens survive at each stage (see :class:`PDrop`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from ...core import ops
from ...core.budget import Keep
from ...registry import register
from .base import VLM, ModelInfo, StageDecision, StageView, VlmMethod, increasing_layers, scaled_layers

__all__ = ["PDrop"]


@register("pdrop", modality="multimodal", integration=VLM,
          paper="Xing et al., PyramidDrop: Pyramid Visual Redundancy Reduction, CVPR 2025",
          equation="stage s keeps lambda^s visual tokens ranked by softmax(q_last k^T/sqrt d)",
          presets={"paper": {"keep": Keep([0.5, 0.25, 0.125])}})
@dataclass
class PDrop(VlmMethod):
    """PyramidDrop (Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid
    Visual Redundancy Reduction", CVPR 2025).

    The LLM is split into stages at layers (8, 16, 24) of 32 (scaled to the model); at the start of stage s
    the visual tokens are ranked by the attention the last instruction token pays them, computed with that
    layer's own q/k on its input, s_i = mean_h softmax(q_last k^T / sqrt(d))_i, and lambda of them survive,
    so stage s keeps lambda^s of the image tokens (paper: lambda = 0.5). Positions are re-indexed
    contiguously (official code).

    ``keep`` (the fraction of the visual-token work): lambda is solved so that the mean over all layers
    of the visual tokens is closest to keep; no stage leaves fewer than one visual token per image (so a
    small keep does not end with zero visual tokens; a keep below what that floor allows is a ValueError
    naming the range). ``tr.Keep([l1, l2, l3])`` gives each stage's kept fraction of the image tokens;
    preset ``"paper"``: lambda = 0.5 (``Keep([0.5, 0.25, 0.125])``)."""

    layers: Sequence[int] | None = None
    positions: ClassVar[str] = "compact"
    label: ClassVar[str] = "pdrop"
    takes_count: ClassVar[bool] = False
    least_hint: ClassVar[str] = "; earlier layers= reach less"
    own_terms: ClassVar[str] = "Keep([...]): the fraction of the image tokens kept at each stage (lambda^s)"

    def setup(self, info: ModelInfo) -> None:
        super().setup(info)
        layers = self.layers if self.layers is not None else scaled_layers((8, 16, 24), 32, info.depth)
        self.stages = increasing_layers(layers, info.depth)

    def stage_fractions(self, knob: float) -> list[float]:
        return [knob ** (s + 1) for s in range(len(self.stages))]

    def score_layer(self, stage: int) -> int:
        return self.stages[stage]

    def reduce_stage(self, view: StageView) -> StageDecision:
        s = view.last_query_scores(view.layer)
        return StageDecision(ops.masked_topk(s, view.visual, self.stage_counts(view)))
