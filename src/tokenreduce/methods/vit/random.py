"""Random pruning baseline on ViT layers (see :class:`RandomPrune`)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ...core import criteria as C
from ...core import strategies as S
from ...core.state import TokenState
from ...registry import register
from .base import VIT, StageMethod

__all__ = ["RandomPrune"]


@register("random", modality="vision", integration=VIT, paper="random pruning baseline",
          equation="keep a seeded random subset")
@dataclass
class RandomPrune(StageMethod):
    """Random pruning baseline: at each stage keep a random ``keep`` fraction of the tokens (``seed``)."""

    seed: int = 0

    def reduce(self, layer: int, state: TokenState, ctx: dict[str, Tensor]) -> TokenState:
        scores = C.Random(seed=self.seed * 1000 + layer)(state)
        return S.prune(state, scores, self.counts(layer, state, scores))
