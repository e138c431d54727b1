"""TokenSelect on the KV cache: a per-query selection of the whole cache (see :class:`TokenSelect`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ...core import kv as K
from ...registry import register
from .base import KV, KVContext, KVMethod

__all__ = ["TokenSelect"]


@register("tokenselect", modality="language", integration=KV,
          paper="Wu et al., TokenSelect: Efficient Long-Context Inference via Dynamic Token-Level KV Cache "
                "Selection, 2025",
          equation="S_i = sum_h softmax_i(q_h k_{h,i}); attend to init + local + argtop S",
          presets={"short": {"n_init": 4, "n_local": 16}},
          keep_meaning="fraction of the cache entries each decoding query attends to (the cache itself is not "
                       "reduced: the attended entries are)")
@dataclass
class TokenSelect(KVMethod):
    """TokenSelect (Wu et al., "TokenSelect: Efficient Long-Context Inference and Length Extrapolation for LLMs
    via Dynamic Token-Level KV Cache Selection", 2025), Sec. 3.

    The cache is kept whole; each decoding query attends only to ``n_init`` initial tokens, ``n_local`` recent
    tokens and the top tokens by the head soft vote ``S_i = sum_h softmax_i(q_h . k_{h,i})`` (Eq. 7-8), the
    selection shared by all heads; ``budget = keep x entries`` in total. Selection cache (Sec. 3.4): if the
    cosine similarity of consecutive queries exceeds ``reuse_threshold`` the previous selection is reused.
    Reference defaults: n_init 128, n_local 512, threshold 0.9. The prompt is prefilled in full here (the
    paper also selects inside chunked prefill).

    TokenSelect does not shrink the cache (its KV bytes stay those of the unreduced cache): its ``keep`` is the
    fraction of the entries each decoding query attends to, ``round(keep x n)`` of the ``n`` it could see, in
    every layer (``h.stats.attended`` / ``h.stats.attendable``; ``keep_achieved`` their ratio over the layers).
    Where ``n_init + n_local`` leave no room for a selection (prompts under ~2,560 tokens at keep 0.25 with the
    reference defaults), both shrink in proportion to half of what the question leaves (noted in the stats).
    Preset ``"short"`` = ``n_init=4, n_local=16`` (what ``bench kv`` runs on 1k-4k-token prompts, leaving most
    of the budget to the selection).
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

    def forced(self, ctx: KVContext) -> Tensor:
        both = (ctx.first(self.n_init) | ctx.recent(self.n_local))[:, :1]
        if ctx.budget is None:
            return both
        room = ctx.room()  # what the question leaves for the initial/local tokens and the selection
        outside = both if ctx.question is None else both & ~ctx.question[:, :1]
        fits = outside.sum(-1)[:, 0] < room  # at least one selected entry
        if bool(fits.all()):
            return both
        total = self.n_init + self.n_local
        half = (room // 2).clamp(min=0)
        n_init = torch.where(fits, self.n_init, torch.round(half.double() * self.n_init / max(total, 1)).long())
        n_local = torch.where(fits, self.n_local, half - n_init)
        self.shrink_note(ctx, "n_init + n_local", f"{self.n_init} + {self.n_local}", n_init + n_local, fits)
        return (ctx.first(n_init) | ctx.recent(n_local))[:, :1]

    def forced_desc(self) -> str:
        return f"the n_init ({self.n_init}) initial and n_local ({self.n_local}) local tokens"

    def score(self, ctx: KVContext) -> Tensor:
        return K.head_soft_vote(ctx.query, ctx.keys, ctx.valid[:, :1])
