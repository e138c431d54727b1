"""Truncation baseline for prompts (see :class:`Truncate`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ...registry import register
from .base import PROMPT, Prompt, PromptMethod, in_order

__all__ = ["Truncate"]


@register("truncate", modality="language", integration=PROMPT, paper="truncation baseline", equation="keep x_1..x_k")
@dataclass
class Truncate(PromptMethod):
    """Truncation baseline: keep the first ``keep`` tokens (``from_end=True``: the last ones)."""

    from_end: bool = False

    def select(self, p: Prompt, prep: Any, target: int) -> np.ndarray:
        ntok = p.pieces.ntok[::-1] if self.from_end else p.pieces.ntok
        keep = np.cumsum(ntok) <= target
        if self.from_end:
            keep = keep[::-1]
        return in_order(keep)
