"""Random merging baseline (see :class:`RandomMerge`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...core.diffusion import MergeMap, window_map
from ...registry import register
from .base import DIFFUSION, SiteCall, StrideMethod

__all__ = ["RandomMerge"]


@register("random", modality="vision", integration=DIFFUSION, paper="random merging baseline",
          equation="ToMe for SD's partition; a seeded random r sources merged into their own window's destination")
@dataclass
class RandomMerge(StrideMethod):
    """Baseline for the criterion: ToMe for SD's windows and counts, but the ``r`` merged sources are a seeded
    random choice (the same for every sample of the batch) and each merges into the destination of its own
    window instead of its most similar one."""

    def token_map(self, site: SiteCall, metric: Tensor, keep: float) -> MergeMap:
        h, w = site.grid
        src, dst = self.partition(site, metric.device)
        r = self.merged(site, keep, src.shape[0])
        pick = torch.randperm(src.shape[0], generator=site.generator(self.seed, salt=1))[:r].sort().values
        return window_map(h, w, self.sx, self.sy, src, dst, src[pick.to(src.device)].unsqueeze(0))
