"""Average-pooling baseline (see :class:`PoolMerge`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from ...core.diffusion import MergeMap, pool_map
from ...registry import register
from .base import DIFFUSION, MergeMethod, SiteCall

__all__ = ["PoolMerge"]


@register("pool", modality="vision", integration=DIFFUSION, paper="spatial average pooling baseline",
          equation="tokens of an h x w grid -> cells of an (h sqrt(keep)) x (w sqrt(keep)) grid, mean per cell; "
                   "unmerge: nearest (each token reads its cell)")
@dataclass
class PoolMerge(MergeMethod):
    """Baseline without any criterion: average-pool the block's token grid to about ``keep`` of its tokens
    (each side scaled by sqrt(keep)), run the operation on the cells, give every token its cell's output."""

    _maps: dict = field(default_factory=dict, init=False, repr=False)

    def token_map(self, site: SiteCall, metric: Tensor, keep: float) -> MergeMap:
        key = (site.grid, keep, metric.device)
        if key not in self._maps:
            self._maps[key] = pool_map(*site.grid, keep, metric.device)
        return self._maps[key]
