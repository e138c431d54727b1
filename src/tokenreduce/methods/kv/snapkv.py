"""SnapKV on the KV cache: observation-window votes after the prompt (see :class:`SnapKV`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ...core import kv as K
from ...registry import register
from .base import KV, KVContext, KVMethod, check_window_and_pooling

__all__ = ["SnapKV"]


@register("snapkv", modality="language", integration=KV,
          paper="Li et al., SnapKV: LLM Knows What You are Looking for Before Generation, NeurIPS 2024",
          equation="S = smooth1d(sum_{q in window} softmax(qK^T/sqrt d)); keep window + argtop S")
@dataclass
class SnapKV(KVMethod):
    """SnapKV (Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", 2024), Alg. 1.

    After the prompt, per KV head: attention of the last ``window_size`` prompt queries (the observation
    window, i.e. the question) over the prefix, ``C = sum_{q in window} softmax(q K^T/sqrt(d))``, pooled along
    the sequence ``S = smooth1d(C, kernel_size)``; keep the window plus ``argtop_{budget - window} S``.
    Defaults of the reference code: window 32, kernel 5, average pooling. ``window_size="question"`` makes the
    observation window exactly the question (``question_len`` tokens per sample), the paper's QA framing.
    """

    window_size: int | str = 32
    kernel_size: int = 5
    pooling: str = "avgpool"
    name: ClassVar[str] = "snapkv"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_window_and_pooling(self)

    def window(self, ctx: KVContext) -> int | Tensor:
        return ctx.question_len if self.window_size == "question" else self.window_size

    def forced(self, ctx: KVContext, budget: Tensor) -> Tensor:
        return ctx.prompt_tail(self.window(ctx))[:, :1]

    def forced_desc(self) -> str:
        if self.window_size == "question":
            return "the observation window (the question)"
        return f"the observation window ({self.window_size} tokens)"

    def score(self, ctx: KVContext) -> Tensor:
        w = self.window(ctx)
        return K.snapkv_votes(ctx.window_probs(w), self.kernel_size, self.pooling, exclude=ctx.prompt_tail(w))
