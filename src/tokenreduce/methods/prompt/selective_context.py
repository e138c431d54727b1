"""Selective Context: keep the units with the highest self-information (see :class:`SelectiveContext`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ...core.text import fill_budget, group_units
from ...registry import register
from .base import PROMPT, Prompt, PromptMethod, in_order

__all__ = ["SelectiveContext"]


@register("selective-context", modality="language", integration=PROMPT,
          paper="Li et al., Compressing Context to Enhance Inference Efficiency of LLMs (Selective Context), EMNLP 2023",
          equation="I(u)=sum_{t in u} -log p(x_t|x_<t); keep top units")
@dataclass
class SelectiveContext(PromptMethod):
    """Selective Context (Li et al., "Compressing Context to Enhance Inference Efficiency of Large Language
    Models", EMNLP 2023): self-information I(x_t) = -log p(x_t | x_<t) from one causal-LM pass (Eq. 1), a
    lexical unit's information is the sum over its tokens (Eq. 3), the most informative units are kept
    (the paper filters by a percentile; here the budget is exact in tokens). ``unit``: token | word | sentence
    (the paper's best is noun phrases via spaCy; words are the closest unit without a parser).
    """

    unit: str = "word"
    reduce: str = "sum"
    needs_lm: ClassVar[bool] = True

    def prepare(self, p: Prompt, target: int) -> np.ndarray:
        units = p.units(self.unit)
        return group_units(units[p.pieces.piece_of_token], p.self_information, int(units.max()) + 1, self.reduce)

    def select(self, p: Prompt, prep: np.ndarray, target: int) -> np.ndarray:
        return in_order(fill_budget(p.units(self.unit), p.pieces.ntok, prep, target))
