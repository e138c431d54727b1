"""FastV inside the LLM: prune visual tokens at layer K by the last token's attention (see :class:`FastV`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...core import ops
from ...core.budget import Keep
from ...registry import register
from .base import VLM, ModelInfo, StageDecision, StageView, VlmMethod, check_layer, scaled_layers

__all__ = ["FastV"]


@register("fastv", modality="multimodal", integration=VLM,
          paper="Chen et al., An Image is Worth 1/2 Tokens After Layer 2 (FastV), ECCV 2024",
          equation="s_i=mean_h A^{K-1}_h[last,i]; keep top (1-R) visual tokens from layer K",
          presets={"paper": {"keep": Keep([0.5])}})
@dataclass
class FastV(VlmMethod):
    """FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024).

    At layer K, visual token i is scored by the attention the last token pays it in layer K-1, averaged
    over heads, s_i = mean_h A^{(K-1)}_h[last, i]; the top (1-R) of the visual tokens are kept from layer K
    on with their original position ids (the official code's ``position_ids = keep_indexs``).
    ``layer`` = K (default: the paper's K=2 of LLaVA-1.5's 32 layers scaled to the model, at least 1).

    ``keep`` (the fraction of the visual-token work): the kept fraction f = 1 - R solves
    (K + (L - K) f) / L = keep for an L-layer LLM, so a keep below K/L (plus one token per image) is
    unreachable (a ValueError naming the range; an earlier ``layer`` reaches less). ``tr.Keep([f])`` gives
    FastV's own 1 - R; preset ``"paper"``: R = 50% (``Keep([0.5])``)."""

    layer: int | None = None
    label: ClassVar[str] = "fastv"
    takes_count: ClassVar[bool] = False
    least_hint: ClassVar[str] = "; an earlier layer= reaches less"
    own_terms: ClassVar[str] = "Keep([f]): the fraction f = 1 - R of the visual tokens kept from layer K on"

    def setup(self, info: ModelInfo) -> None:
        super().setup(info)
        lay = self.layer if self.layer is not None else scaled_layers((2,), 32, info.depth)[0]
        self.stages = (check_layer(lay, info.depth, "layer"),)

    def stage_fractions(self, knob: float) -> list[float]:
        return [knob]

    def reduce_stage(self, view: StageView) -> StageDecision:
        s = view.last_query_scores(view.layer - 1)
        return StageDecision(ops.masked_topk(s, view.visual, self.stage_counts(view)))
