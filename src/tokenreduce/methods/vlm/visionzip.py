"""VisionZip before the LLM: dominant + contextual tokens from the vision layer LLaVA uses (see :class:`VisionZip`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from ...core import visual as V
from ...registry import register
from .base import VLM, VlmMethod

__all__ = ["VisionZip"]


@register("visionzip", modality="multimodal", integration=VLM,
          paper="Yang et al., VisionZip: Longer is Better but Not Necessary in VLMs, CVPR 2025",
          equation="dominant=topk sum_h A[cls,i]; contextual x_t'=x_t+mean_{i->t} x_i (key similarity)",
          presets={"paper": {"keep": 64 / 576}})
@dataclass
class VisionZip(VlmMethod):
    """VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in VLMs", CVPR 2025).

    On the vision layer that produces LLaVA's features: dominant tokens = top-k of the [CLS] attention
    a_i = sum_h A_h[cls, i] (Sec. 3.2, Eq. 1); contextual tokens: the rest are grouped by key similarity to
    uniformly spaced targets and merged, x_t' = x_t + mean_{i -> t} x_i (official code); then LLaVA's
    projector. ``contextual``: fraction of the budget that is contextual (10/64 in the paper's
    64-token setting). Towers without [CLS] use the mean attention received instead.

    ``keep``: the fraction of each image's tokens kept (= of the visual-token work); ``tr.Keep(count=n)``: n
    tokens per image; preset ``"paper"``: LLaVA-1.5's 64 of 576 tokens (keep = 64/576).
    """

    contextual: float = 10 / 64
    positions: str = "compact"
    where: ClassVar[str | None] = "pre"
    label: ClassVar[str] = "visionzip"

    def vision_layers(self) -> dict[int, frozenset[str]]:
        return {self.info.feature_layer: frozenset({"cls" if self.info.has_cls else "mean", "keys"})}

    def reduce_image(self, x: Tensor, ctx: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        if not 0.0 <= self.contextual < 1.0:
            raise ValueError(f"contextual={self.contextual} must be in [0, 1)")
        k = self.count(x.shape[1])
        n_ctx = min(round(k * self.contextual), k - 1) if k > 1 else 0
        lay = self.info.feature_layer
        score = ctx["cls"][lay] if self.info.has_cls else ctx["mean"][lay]
        return V.visionzip_merge(x, score, ctx["keys"][lay], k - n_ctx, n_ctx)
