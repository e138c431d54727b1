"""Spatial average-pooling baseline on ViT layers (see :class:`Pool`)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ...core import strategies as S
from ...core.state import TokenState
from ...registry import register
from .base import VIT, StageMethod

__all__ = ["Pool"]


@register("pool", modality="vision", integration=VIT, paper="spatial average pooling baseline",
          equation="adaptive avg-pool of the patch grid")
@dataclass
class Pool(StageMethod):
    """Spatial average-pooling baseline: at each stage pool the patch grid to about ``keep`` of its cells
    (adaptive bins, size-weighted; the CLS token untouched). Proportional attention on."""

    prop_attn: bool = True

    def tokens_after(self, n: int, count: int, grid: tuple[int, int] | None) -> tuple[int, tuple[int, int] | None]:
        if grid is None:
            return count, None
        oh, ow = S.grid_for_count(grid, count)
        return oh * ow, (oh, ow)

    def reduce(self, layer: int, state: TokenState, ctx: dict[str, Tensor]) -> TokenState:
        return S.pool(state, self.counts(layer, state))
