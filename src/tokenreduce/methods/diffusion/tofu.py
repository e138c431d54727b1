"""Token Fusion (see :class:`ToFu`)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ...core.diffusion import MergeMap, bipartite_map
from ...registry import register
from .base import DIFFUSION, SiteCall, StrideMethod

__all__ = ["ToFu"]


@register("tofu", modality="vision", integration=DIFFUSION,
          paper="Kim et al., Token Fusion: Bridging the Gap between Token Pruning and Token Merging, WACV 2024",
          equation="early blocks: prune (x_dst kept); late blocks: MLERP x = mean(x_i)/||mean(x_i)|| * max_i ||x_i||")
@dataclass
class ToFu(StrideMethod):
    """Token Fusion (Kim et al., WACV 2024) on ToMe for SD's matching.

    ToFu prunes where the model responds non-linearly to interpolated inputs and merges where it is close to
    linear (early blocks prune, late blocks merge); its merge is MLERP, which keeps the norm distribution
    that averaging shrinks: x = (sum_i x_i / n) / ||sum_i x_i / n|| * max_i ||x_i||. Here: the matching of
    :class:`~tokenreduce.methods.diffusion.tomesd.ToMeSD`; in the first ``prune_until`` fraction of the
    reducing blocks (in execution order) the matched sources are pruned (their destination keeps its value,
    they read its output back), in the later ones they are merged with MLERP.
    """

    prune_until: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.prune_until <= 1.0:
            raise ValueError(f"prune_until={self.prune_until!r} is out of range: a fraction in [0, 1] of the blocks")

    def token_map(self, site: SiteCall, metric: Tensor, keep: float) -> MergeMap:
        src, dst = self.partition(site, metric.device)
        mode = "prune" if site.index < self.prune_until * site.count else "mlerp"
        return bipartite_map(metric, src, dst, self.merged(site, keep, src.shape[0]), mode)
