"""FastV inside the LLM: prune visual tokens at layer K by the last token's attention (see :class:`FastV`)."""

from __future__ import annotations

from dataclasses import dataclass

from ...core import ops
from ...core.budget import KeepLike
from ...registry import register
from .base import VLM, ModelInfo, StageDecision, StageView, VlmMethod, check_layer

__all__ = ["FastV"]


@register("fastv", modality="multimodal", integration=VLM,
          paper="Chen et al., An Image is Worth 1/2 Tokens After Layer 2 (FastV), ECCV 2024",
          equation="s_i=mean_h A^{K-1}_h[last,i]; keep top (1-R) visual tokens from layer K")
@dataclass
class FastV(VlmMethod):
    """FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024).

    At layer K, visual token i is scored by the attention the last token pays it in layer K-1, averaged
    over heads, s_i = mean_h A^{(K-1)}_h[last, i]; the top (1-R) of the visual tokens are kept from layer K
    on with their original position ids (the official code's ``position_ids = keep_indexs``).
    ``layer`` = K (paper: 2), ``keep`` = 1 - R (paper: R = 50%)."""

    keep: KeepLike = 0.5
    layer: int = 2

    def setup(self, info: ModelInfo) -> None:
        super().setup(info)
        self.stages = (check_layer(self.layer, info.depth, "layer"),)

    def reduce_stage(self, view: StageView) -> StageDecision:
        s = view.last_query_scores(view.layer - 1)
        return StageDecision(ops.masked_topk(s, view.visual, view.counts(self.keep)))
