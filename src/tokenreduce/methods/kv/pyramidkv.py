"""PyramidKV on the KV cache: SnapKV's selection with budgets shrinking with depth (see :class:`PyramidKV`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ...core import kv as K
from ...registry import register
from .base import KV, KVContext, shrunk_window
from .snapkv import SnapKV

__all__ = ["PyramidKV"]


@register("pyramidkv", modality="language", integration=KV,
          paper="Cai et al., PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling, 2024",
          equation="k_l = k_0 - l(k_0-k_{L-1})/(L-1), k_{L-1} = keep/beta; SnapKV scores",
          presets={"question": {"window_size": "question"}})
@dataclass
class PyramidKV(SnapKV):
    """PyramidKV (Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
    Funneling", 2024), Eq. 6-7: SnapKV's selection with layer-wise budgets that shrink linearly with depth,
    ``k_l = k_0 - l (k_0 - k_{L-1}) / (L-1)``, ``k_{L-1} = k / beta``; the observation window is kept on top of
    the pyramid in every layer, as in the reference code (:meth:`layer_budget`). Paper default beta = 20; takes
    a fraction ``keep`` (a count cannot be distributed over layers).

    ``keep`` is the same total as for the other methods, distributed over the layers: the per-layer budgets
    average to ``round(keep n)``, so the cache holds ``keep`` of its entries over all layers when the layers
    hold as many entries (Llama, Qwen2); with Gemma 3's shorter sliding-window layers the pyramid is computed
    on each layer's own entries, and ``h.stats.keep_achieved`` says what the whole cache kept. A window that
    leaves no room in the mean budget shrinks to half of it (noted in the stats).

    Preset ``"question"`` = ``window_size="question"`` (``bench kv``'s ``pyramidkv-q``).
    """

    beta: float = 20.0
    name: ClassVar[str] = "pyramidkv"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.keep, float):
            got = f"tr.Keep(count={self.keep})" if isinstance(self.keep, int) else repr(self.keep)
            raise TypeError(f"pyramidkv distributes a ratio over layers: keep must be a float fraction in (0, 1], "
                            f"got {got}")
        if not self.beta >= 1:
            raise ValueError(f"beta must be >= 1, got {self.beta!r}")

    def layer_keep(self, layer: int, num_layers: int) -> float:
        r = K.pyramid_ratios(float(self.keep), num_layers, self.beta)[layer]
        return min(max(r, 1e-9), 1.0)

    def mean_budget(self, n: Tensor) -> Tensor:
        """(B,) the mean budget over layers of a layer holding ``n`` (B,) entries: ``round(keep n)`` (>= 1)."""
        return torch.round(n.double() * float(self.keep)).long().clamp(min=1)

    def window_budget(self, ctx: KVContext) -> Tensor:
        """The window must leave room in the mean budget (it sits on top of every layer's share)."""
        assert ctx.natural is not None
        return self.mean_budget(ctx.natural)

    def layer_budget(self, layer: int, num_layers: int, n: Tensor, question_len: Tensor) -> Tensor:
        """The reference code's arithmetic on token counts: with ``w`` the window and ``s = round(keep n) - w``
        the mean selectable entries, ``s_min = s // beta``, ``s_max = 2 s - s_min`` (if ``s_max > n - w``:
        ``s_max = n - w``, ``s_min = 2 s - s_max``), layer l keeps ``w + s_max - l (s_max - s_min)/(L-1)``."""
        mean = self.mean_budget(n)
        w = question_len if self.window_size == "question" else shrunk_window(int(self.window_size), mean)[0]
        w = torch.minimum(w, n)
        s = mean - w
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
