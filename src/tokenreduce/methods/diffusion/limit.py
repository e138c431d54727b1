"""The zero-overhead references of the diffusion benchmark (not registered: no criterion, no method).

Each runs the same operations of the same blocks on the same token counts as a measured method, but takes
the first K tokens (a slice: no matching, no gather) and restores the N-token output with one copy
(:class:`~tokenreduce.core.diffusion.SliceMap`): what a reduction to those counts could at best save on this
machine. ``counts`` maps a site index to its kept tokens (from the method's ``Handle.stats``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from ...core.diffusion import SliceMap
from .base import DiffusionMethod, MergeMethod, SiteCall
from .toca import ToCa

__all__ = ["SliceCache", "SliceKV", "SliceMerge"]


@dataclass
class SliceMerge(MergeMethod):
    """Merging methods' reference: each reduced operation on the first ``counts[site]`` tokens."""

    counts: dict[int, int] = field(default_factory=dict)

    def token_map(self, site: SiteCall, metric: Tensor, keep: float) -> SliceMap:
        return SliceMap(site.tokens, self.counts.get(site.index, site.tokens))


@dataclass
class SliceKV(DiffusionMethod):
    """Keys/values methods' reference: keys and values of the first ``counts[site]`` tokens."""

    counts: dict[int, int] = field(default_factory=dict)
    kv_only: ClassVar[bool] = True

    def kv_map(self, site: SiteCall, keep: float, device: torch.device) -> SliceMap:
        return SliceMap(site.tokens, self.counts.get(site.index, site.tokens))


@dataclass
class SliceCache(ToCa):
    """ToCa's reference: the same full steps and fresh-token counts, the first k tokens as the fresh ones
    (no attention-received score, no selection, no scatter)."""

    uses_attention: ClassVar[bool] = False

    def select(self, influence: Tensor | None, stale: Tensor, grid: tuple[int, int], k: int) -> None:
        return None
