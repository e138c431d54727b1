"""TokenSelect on the KV cache: a per-query selection of the whole cache (see :class:`TokenSelect`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ...core import kv as K
from ...registry import register
from .base import KV, KVContext, KVMethod

__all__ = ["TokenSelect"]


@register("tokenselect", modality="language", integration=KV,
          paper="Wu et al., TokenSelect: Efficient Long-Context Inference via Dynamic Token-Level KV Cache "
                "Selection, 2025",
          equation="S_i = sum_h softmax_i(q_h k_{h,i}); attend to init + local + argtop S")
@dataclass
class TokenSelect(KVMethod):
    """TokenSelect (Wu et al., "TokenSelect: Efficient Long-Context Inference and Length Extrapolation for LLMs
    via Dynamic Token-Level KV Cache Selection", 2025), Sec. 3.

    The cache is kept whole; each decoding query attends only to ``n_init`` initial tokens, ``n_local`` recent
    tokens and the top tokens by the head soft vote ``S_i = sum_h softmax_i(q_h . k_{h,i})`` (Eq. 7-8), the
    selection shared by all heads; ``budget = keep x entries`` in total. Selection cache (Sec. 3.4): if the
    cosine similarity of consecutive queries exceeds ``reuse_threshold`` the previous selection is reused.
    Reference defaults: n_init 128, n_local 512, threshold 0.9. The prompt is prefilled in full here (the
    paper also selects inside chunked prefill); the KV bytes do not shrink — the attended tokens do.
    """

    n_init: int = 128
    n_local: int = 512
    reuse_threshold: float | None = 0.9
    phase: ClassVar[str] = "select"
    shared_heads: ClassVar[bool] = True
    name: ClassVar[str] = "tokenselect"

    def __post_init__(self) -> None:
        super().__post_init__()
        for k in ("n_init", "n_local"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{k} must be an int >= 0, got {v!r}")
        if self.reuse_threshold is not None and not -1.0 <= self.reuse_threshold <= 1.0:
            raise ValueError(f"reuse_threshold must be in [-1, 1] or None, got {self.reuse_threshold!r}")

    def forced(self, ctx: KVContext, budget: Tensor) -> Tensor:
        return (ctx.first(self.n_init) | ctx.recent(self.n_local))[:, :1]

    def forced_desc(self) -> str:
        return f"n_init ({self.n_init}) + n_local ({self.n_local})"

    def score(self, ctx: KVContext) -> Tensor:
        return K.head_soft_vote(ctx.query, ctx.keys, ctx.valid[:, :1])
