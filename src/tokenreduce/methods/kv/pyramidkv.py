"""PyramidKV on the KV cache: SnapKV's selection with budgets shrinking with depth (see :class:`PyramidKV`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ...core import kv as K
from ...registry import register
from .base import KV
from .snapkv import SnapKV

__all__ = ["PyramidKV"]


@register("pyramidkv", modality="language", integration=KV,
          paper="Cai et al., PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling, 2024",
          equation="k_l = k_0 - l(k_0-k_{L-1})/(L-1), k_{L-1} = keep/beta; SnapKV scores")
@dataclass
class PyramidKV(SnapKV):
    """PyramidKV (Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
    Funneling", 2024), Eq. 6-7: SnapKV's selection with layer-wise budgets that shrink linearly with depth,
    ``k_l = k_0 - l (k_0 - k_{L-1}) / (L-1)``, ``k_{L-1} = k / beta``, mean over layers = ``keep``; the
    observation window is kept on top of the pyramid in every layer, as in the reference code
    (:meth:`layer_budget`). Paper default beta = 20; takes a ratio ``keep``.
    """

    beta: float = 20.0
    name: ClassVar[str] = "pyramidkv"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.keep, float):
            raise TypeError(f"pyramidkv distributes a ratio over layers: keep must be a float in (0, 1], "
                            f"got {self.keep!r}")
        if not self.beta >= 1:
            raise ValueError(f"beta must be >= 1, got {self.beta!r}")

    def layer_keep(self, layer: int, num_layers: int) -> float:
        r = K.pyramid_ratios(float(self.keep), num_layers, self.beta)[layer]
        return min(max(r, 1e-9), 1.0)

    def layer_budget(self, layer: int, num_layers: int, n: Tensor, question_len: Tensor) -> Tensor:
        """The reference code's arithmetic on token counts: with ``w`` the window and ``s = round(keep n) - w``
        the mean selectable entries, ``s_min = s // beta``, ``s_max = 2 s - s_min`` (if ``s_max > n - w``:
        ``s_max = n - w``, ``s_min = 2 s - s_max``), layer l keeps ``w + s_max - l (s_max - s_min)/(L-1)``."""
        w = question_len if self.window_size == "question" else torch.full_like(n, int(self.window_size))
        w = torch.minimum(w, n)
        s = torch.round(n.double() * float(self.keep)).long() - w
        s_min = torch.div(s, self.beta, rounding_mode="floor").long()
        s_max = 2 * s - s_min
        over = s_max > n - w
        s_max = torch.where(over, n - w, s_max)
        s_min = torch.where(over, 2 * s - s_max, s_min)
        if num_layers == 1:
            sel = s
        else:
            sel = torch.round(s_max.double() - layer * (s_max - s_min).double() / (num_layers - 1)).long()
        return torch.minimum(w + sel.clamp(min=0), n).clamp(min=1) if bool((s >= 0).all()) else w + s
