"""TRIM before the LLM: the visual tokens most similar to the question, the rest averaged into one (see :class:`Trim`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ...core import ops
from ...core.criteria import QUESTION_POOLS, question_similarity
from ...registry import register
from .base import VLM, VlmMethod, select_tokens

__all__ = ["Trim"]


@register("trim", modality="multimodal", integration=VLM,
          paper="Song et al., Less is More: A Simple yet Effective Token Reduction Method for Efficient "
                "Multi-modal LLMs (TRIM), COLING 2025",
          equation="s_i=softmax_i cos(v_i, t_question); keep top-(K-1) by s, the rest averaged into 1 token")
@dataclass
class Trim(VlmMethod):
    """TRIM (Song et al., "Less is More: A Simple yet Effective Token Reduction Method for Efficient Multi-modal
    LLMs", COLING 2025): a question-aware reduction before the LLM. Each visual token is scored by its
    similarity to the question, s_i = softmax_i cos(v_i, t) (the paper: CLIP's image-token and text features;
    here the projected visual tokens and the question's token embeddings in the LLM's input space, the space the
    projector maps into; ``pool``: the mean of the question's embeddings, TRIM's pooled text feature, or each
    token's best-matching word), the most similar tokens are kept, and the unselected ones are averaged into one
    token appended after them (TRIM's aggregated token, ``aggregate``; its source patch is -1, none, so it
    needs ``positions="compact"``, the default).

    Budget: the paper keeps the IQR outliers (s_i > Q3 + 1.5 IQR, an adaptive count); here ``keep`` sets the
    count, K = round(keep x N) tokens per image (K - 1 selected + the aggregate), so it is compared with the other
    methods at equal budgets. No fine-tuning (the paper also fine-tunes LLaVA with TRIM)."""

    pool: str = "mean"
    aggregate: bool = True
    positions: str = "compact"
    where: ClassVar[str | None] = "post"
    needs_question: ClassVar[bool] = True
    label: ClassVar[str] = "trim"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pool not in QUESTION_POOLS:
            raise ValueError(f"pool={self.pool!r} is invalid: accepted {QUESTION_POOLS}")
        if self.positions == "keep" and self.aggregate:
            raise ValueError("trim: positions='keep' gives every token its patch's position id, and the aggregate "
                             "token has no patch; use positions='compact' or aggregate=False")

    def reduce_image(self, x: Tensor, ctx: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        if "question" not in ctx:
            raise RuntimeError("trim needs the prompt's text (ctx['question']); apply it through tr.apply on a VLM")
        text, mask = ctx["question"]
        B, N, _ = x.shape
        k = self.count(N)
        scores = question_similarity(x, text, mask, self.pool)
        n_sel = k - 1 if self.aggregate and 1 < k < N else k
        chosen = ops.masked_topk(scores, torch.ones(B, N, dtype=torch.bool, device=x.device),
                                 torch.full((B,), n_sel, device=x.device))  # ties: the lower index
        out, idx, size = select_tokens(x, chosen)  # in patch order
        if n_sel == k:
            return out, idx, size
        rest = ~chosen
        w = rest.to(x.dtype)[..., None]
        agg = (x * w).sum(1, keepdim=True) / w.sum(1, keepdim=True)
        src = torch.cat([idx, torch.full_like(idx[:, :1], -1)], 1)
        return torch.cat([out, agg], 1), src, torch.cat([size, rest.sum(1, keepdim=True).to(size.dtype)], 1)
