"""Token Transforming on ViT layers: many-to-many X' = TX (see :class:`TokenTransforming`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ...core import criteria as C
from ...core import strategies as S
from ...core.state import TokenState
from ...registry import register
from .base import VIT, StageMethod

__all__ = ["TokenTransforming"]


@register("token-transforming", modality="vision", integration=VIT,
          paper="Zeng et al., Token Transforming: A Unified and Training-Free Token Compression Framework, 2025",
          equation="X'=TX, T_ji=softmax_j(cos(k_i,k_j)/tau) over top-k targets")
@dataclass
class TokenTransforming(StageMethod):
    """Token Transforming (Zeng, Yu, Kong, Tang, arXiv:2506.05709, 2025): reduction as X' = T X with a
    many-to-many matrix T. Targets are the most informative tokens by CLS attention; every other token is
    spread over its ``topk`` most similar targets (keys, softmax with temperature ``tau``); see
    :func:`tokenreduce.core.strategies.transform` for the equations. Proportional attention on.
    """

    topk: int = 4
    tau: float = 0.1
    prop_attn: bool = True
    needs: ClassVar[frozenset[str]] = frozenset({"cls_attn", "metric"})

    def reduce(self, layer: int, state: TokenState, ctx: dict[str, Tensor]) -> TokenState:
        scores = C.Attention("cls")(state, **ctx)
        return S.transform(state, ctx["metric"], self.counts(layer, state, scores), scores, topk=self.topk,
                           tau=self.tau)
