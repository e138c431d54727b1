"""ToMe for Stable Diffusion (see :class:`ToMeSD`)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ...core.diffusion import MergeMap, bipartite_map
from ...registry import register
from .base import DIFFUSION, SiteCall, StrideMethod

__all__ = ["ToMeSD"]


@register("tomesd", modality="vision", integration=DIFFUSION,
          paper="Bolya & Hoffman, Token Merging for Fast Stable Diffusion, CVPR Workshops 2023",
          equation="dst = one token per sx x sy window; src -> argmax_dst cos(x_src, x_dst); merge the r = "
                   "int(N(1-keep)) most similar: x_dst = mean; unmerge: every token reads its slot")
@dataclass
class ToMeSD(StrideMethod):
    """Token Merging for Fast Stable Diffusion (Bolya & Hoffman, CVPRW 2023), Sec. 3.

    Per block and step: split the tokens into destinations (one per ``sy x sx`` window, random within the
    window when ``use_rand``, seeded) and sources; bipartite soft matching of sources to destinations by cosine
    similarity of the block input (ToMe, Bolya et al. ICLR 2023, Sec. 3); merge the ``r = int(N (1 - keep))``
    most similar sources into their destination (mean); run self-attention (and, if switched on,
    cross-attention queries / the MLP) on the merged tokens; unmerge: every token takes its slot's output.
    ``keep`` = 1 - tomesd's ``ratio``; the other knobs are tomesd's (``max_downsample``, ``sx``, ``sy``,
    ``use_rand``, ``merge_attn``, ``merge_crossattn``, ``merge_mlp``); ``rematch`` > 1 (not in tomesd) reuses
    each block's map over that many steps (:class:`~tokenreduce.methods.diffusion.base.MergeMethod`).
    """

    def token_map(self, site: SiteCall, metric: Tensor, keep: float) -> MergeMap:
        src, dst = self.partition(site, metric.device)
        return bipartite_map(metric, src, dst, self.merged(site, keep, src.shape[0]), "mean")
