"""Random word-dropping baseline for prompts (see :class:`RandomDrop`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ...core.text import fill_budget
from ...registry import register
from .base import PROMPT, Prompt, PromptMethod, in_order

__all__ = ["RandomDrop"]


@register("random", modality="language", integration=PROMPT, paper="random word-dropping baseline",
          equation="keep a seeded random subset of words")
@dataclass
class RandomDrop(PromptMethod):
    """Random baseline: keep a seeded random subset of ``unit``s (default words) holding ``keep`` tokens."""

    seed: int = 0
    unit: str = "word"

    def select(self, p: Prompt, prep: Any, target: int) -> np.ndarray:
        units = p.units(self.unit)
        scores = np.random.default_rng(self.seed).random(int(units.max()) + 1)
        return in_order(fill_budget(units, p.pieces.ntok, scores, target))
