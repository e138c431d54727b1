"""Token Downsampling (see :class:`ToDo`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ...core.diffusion import IndexMap, downsample_index
from ...registry import register
from .base import DIFFUSION, DiffusionMethod, SiteCall

__all__ = ["ToDo"]


@register("todo", modality="vision", integration=DIFFUSION,
          paper="Smith et al., ToDo: Token Downsampling for Efficient Generation of High-Resolution Images, 2024",
          equation="Attention(Q, K', V') with K', V' from the nearest-exact downsampled token grid; Q full")
@dataclass
class ToDo(DiffusionMethod):
    """Token Downsampling (Smith et al., 2024, arXiv:2402.13573), Sec. 3.

    Neighbouring tokens are similar, so instead of matching tokens (ToMe's cost grows as N^2), downsample the
    keys and values of self-attention on the token grid (nearest-exact, the reference implementation's
    interpolation) and keep the queries at full resolution: softmax(Q K'^T / sqrt(d)) V' with K', V' of
    about ``keep`` N tokens (each side scaled by sqrt(keep); ToDo's downsample factor 2 = keep 0.25). No
    unmerge: the output already has N tokens.
    """

    kv_only: ClassVar[bool] = True
    _index: dict = field(default_factory=dict, init=False, repr=False)

    def kv_map(self, site: SiteCall, keep: float, device: torch.device) -> IndexMap:
        key = (site.grid, keep, device)
        if key not in self._index:
            self._index[key] = IndexMap(site.tokens, downsample_index(*site.grid, keep, device))
        return self._index[key]
