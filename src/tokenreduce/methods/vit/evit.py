"""EViT on ViT layers: CLS-attention top-k plus one fused token (see :class:`EViT`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ...core import criteria as C
from ...core import strategies as S
from ...core.state import TokenState
from ...registry import register
from .base import VIT, StageMethod

__all__ = ["EViT"]


@register("evit", modality="vision", integration=VIT, paper="Liang et al., Not All Patches are What You Need (EViT), ICLR 2022",
          equation="top-k by mean_h A[cls,i]; x_fused=sum_{i inattentive} a_i x_i")
@dataclass
class EViT(StageMethod):
    """EViT (Liang et al., "Not All Patches are What You Need", ICLR 2022).

    At the stage blocks, after attention: keep the ``keep`` fraction of tokens with the largest CLS
    attention averaged over heads (Eq. 3) and fuse the rest into one token x = sum_i a_i x_i (Eq. 4;
    ``normalize_fused=True`` uses the weighted mean instead).
    """

    normalize_fused: bool = False
    needs: ClassVar[frozenset[str]] = frozenset({"cls_attn"})

    def tokens_after(self, n: int, count: int, grid: tuple[int, int] | None) -> tuple[int, None]:
        return count + (count < n), None  # the fused "package" token

    def reduce(self, layer: int, state: TokenState, ctx: dict[str, Tensor]) -> TokenState:
        scores = C.Attention("cls")(state, **ctx)
        return S.prune_package(state, scores, self.counts(layer, state, scores), normalize=self.normalize_fused)
