"""SnapKV on the KV cache: observation-window votes after the prompt (see :class:`SnapKV`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ...core import kv as K
from ...registry import register
from .base import KV, QUESTION_PRESETS, KVContext, KVMethod, check_window_and_pooling, shrunk_window

__all__ = ["SnapKV"]


@register("snapkv", modality="language", integration=KV,
          paper="Li et al., SnapKV: LLM Knows What You are Looking for Before Generation, NeurIPS 2024",
          equation="S = smooth1d(sum_{q in window} softmax(qK^T/sqrt d)); keep window + argtop S",
          presets=QUESTION_PRESETS)
@dataclass
class SnapKV(KVMethod):
    """SnapKV (Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", 2024), Alg. 1.

    After the prompt, per KV head: attention of the last ``window_size`` prompt queries (the observation
    window, i.e. the question) over the prefix, ``C = sum_{q in window} softmax(q K^T/sqrt(d))``, pooled along
    the sequence ``S = smooth1d(C, kernel_size)``; keep the window plus ``argtop_{budget - window} S``.
    Defaults of the reference code: window 32, kernel 5, average pooling. ``window_size="question"`` makes the
    observation window exactly the question (``question_len`` tokens per sample), the paper's QA framing.
    A window that leaves no room for selection in a layer's budget (a short prompt: 32 >= ``round(keep n)``)
    shrinks to half the budget there (noted in the stats).

    Presets: ``"question"`` = ``window_size="question"``; ``"question-max9"`` = the question as window, max
    pooling with kernel 9 (the setting ``tokenreduce bench kv`` runs as ``snapkv-q-max9``, its best SnapKV
    variant on passcode retrieval): ``tr.apply(llm, "snapkv", keep=0.25, preset="question-max9",
    question_len=q)``.
    """

    window_size: int | str = 32
    kernel_size: int = 5
    pooling: str = "avgpool"
    name: ClassVar[str] = "snapkv"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_window_and_pooling(self)

    def window_budget(self, ctx: KVContext) -> Tensor:
        """(B,) the budget the observation window must leave room in: the layer's own."""
        assert ctx.budget is not None
        return ctx.budget

    def window(self, ctx: KVContext) -> int | Tensor:
        """The observation window (int, or (B,) per sample): the question, or ``window_size`` fitted to the
        budget (:func:`~.base.shrunk_window`)."""
        if self.window_size == "question":
            return ctx.question_len
        if ctx.budget is None:
            return int(self.window_size)
        budget = self.window_budget(ctx)
        w, fits = shrunk_window(int(self.window_size), budget)
        if not bool(fits.all()):
            self.shrink_note(ctx, "the observation window", self.window_size, w, fits, budget)
        return w

    def forced(self, ctx: KVContext) -> Tensor:
        return ctx.prompt_tail(self.window(ctx))[:, :1]

    def forced_desc(self) -> str:
        if self.window_size == "question":
            return "the observation window (the question)"
        return f"the observation window ({self.window_size} tokens)"

    def score(self, ctx: KVContext) -> Tensor:
        w = self.window(ctx)
        return K.snapkv_votes(ctx.window_probs(w), self.kernel_size, self.pooling, exclude=ctx.prompt_tail(w))
