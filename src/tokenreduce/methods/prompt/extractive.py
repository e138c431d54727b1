"""Extractive compression: keep the sentences most relevant to the question (see :class:`Extractive`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from ...core.text import fill_budget
from ...registry import register
from .base import PROMPT, Prompt, PromptMethod, in_order

__all__ = ["Extractive"]


@register("extractive", modality="language", integration=PROMPT,
          paper="Hwang et al., EXIT: Context-Aware Extractive Compression for RAG, 2024 (MiniLM relevance variant)",
          equation="keep top sentences by cos(E(s), E(q))")
@dataclass
class Extractive(PromptMethod):
    """Extractive compression in the spirit of EXIT (Hwang et al., "EXIT: Context-Aware Extractive Compression
    for Enhancing Retrieval-Augmented Generation", 2024): split the context into sentences, score each by its
    relevance to the question -- cosine of MiniLM sentence embeddings (``encoder``: (model, tokenizer) of a
    BERT-family encoder, or a callable texts -> embeddings; default all-MiniLM-L6-v2) -- and keep the best
    sentences, in their original order, up to the budget (the last one cut to fill it exactly).
    EXIT's fine-tuned relevance classifier is replaced by the off-the-shelf encoder.
    """

    encoder: Any = None
    needs_question: ClassVar[bool] = True
    needs_encoder: ClassVar[bool] = True

    def prepare(self, p: Prompt, target: int) -> np.ndarray:
        t0 = time.perf_counter()
        sent = p.sentences
        pc = p.pieces
        S = int(sent.max()) + 1
        texts = ["".join(pc.segment(i) for i in np.flatnonzero(sent == s)).strip() or "." for s in range(S)]
        e = torch.as_tensor(p.need_embedder("extractive")(texts + [p.question], self.encoder)).float()
        e = torch.nn.functional.normalize(e, dim=-1)
        p.seconds_scoring += time.perf_counter() - t0
        return (e[:-1] @ e[-1]).numpy().astype(np.float64)

    def select(self, p: Prompt, prep: np.ndarray, target: int) -> np.ndarray:
        return in_order(fill_budget(p.sentences, p.pieces.ntok, prep, target))
