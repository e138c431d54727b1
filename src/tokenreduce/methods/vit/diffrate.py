"""DiffRate on ViT layers: learned per-block pruning and merging counts (see :class:`DiffRate`); trained by
``tokenreduce train vit --reduce diffrate --keep K``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ...core import strategies as S
from ...core.state import TokenState
from ...registry import register
from .base import VIT, VisionMethod
from .learned import LearnedMethod

__all__ = ["DiffRate"]


@register("diffrate", modality="vision", integration=VIT,
          paper="Chen et al., DiffRate: Differentiable Compression Rate for Efficient Vision Transformers, ICCV 2023",
          equation="per block: keep top-P_l by mean_h A[cls,i], merge all but the top-M_l into their most similar; "
                   "P_l, M_l = ceil(sum_k p_k N_k) learned under L = CE + lambda (FLOPs/FLOPs_0 - keep)^2",
          keep_meaning="fraction of the blocks' FLOPs kept: DiffRate's FLOPs target, at which its rates were trained "
                       "(Handle.stats.keep_achieved reports the token-block work)",
          trained_by="tokenreduce train vit --reduce diffrate --keep K")
@dataclass
class DiffRate(LearnedMethod, VisionMethod):
    """DiffRate (Chen et al., "DiffRate: Differentiable Compression Rate for Efficient Vision Transformers",
    ICCV 2023).

    In every block after the first, after attention: sort the tokens by the CLS attention averaged over heads,
    prune to the block's learned count P_l, then merge all but the M_l most important survivors into their most
    similar important token (:func:`~tokenreduce.core.strategies.prune_merge`; size-weighted, with proportional
    attention afterwards as in ToMe). P_l and M_l are fixed numbers, learned by ``tokenreduce train vit --reduce
    diffrate --keep K`` (``tokenreduce.models.vit.learned``; the backbone frozen, as in the paper) as the
    straight-through ceilings of the expected counts of per-block distributions over candidate counts, under a
    FLOPs target: ``keep`` is that target, the fraction of the blocks' FLOPs kept. The counts are stored as
    fractions of the input's patch tokens, so a padded sample with fewer tokens keeps proportionally fewer.

    Differences from the paper's code: merged tokens are size-weighted means whose sizes add up (the
    library's conservation invariant) instead of plain means with similarity-scaled sizes.
    """

    prop_attn: bool = True
    needs: ClassVar[frozenset[str]] = frozenset({"cls_attn"})
    name: ClassVar[str] = "diffrate"
    what: ClassVar[str] = "compression rates"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_budget()
        self.prune_fractions: list[float] | None = None
        self.merge_fractions: list[float] | None = None

    def load(self, artifact: dict[str, Any]) -> None:
        self.prune_fractions = [float(f) for f in artifact["prune"]]
        self.merge_fractions = [float(f) for f in artifact["merge"]]

    def setup(self, depth: int) -> None:
        super().setup(depth)
        if self.prune_fractions is not None and len(self.prune_fractions) != depth:
            raise ValueError(f"diffrate: the rates were trained for {len(self.prune_fractions)} blocks, the model "
                             f"has {depth}")

    def reduces_at(self, layer: int) -> bool:
        return not self.is_identity

    def reduce(self, layer: int, state: TokenState, ctx: dict[str, Tensor]) -> TokenState:
        assert self.prune_fractions is not None and self.merge_fractions is not None
        n = state.reducible_counts()
        if layer == 0:
            self._start = n
        start = self._start.to(torch.float64)
        p = torch.minimum(n, (self.prune_fractions[layer] * start).round().long())
        m = torch.minimum(p, (self.merge_fractions[layer] * start).round().long())
        if bool((m == n).all()):
            return state
        return S.prune_merge(state, ctx["cls_attn"], state.x, p, m)
