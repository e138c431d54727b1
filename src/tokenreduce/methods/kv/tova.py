"""TOVA on the KV cache: evict the entries the current query attends to least (see :class:`TOVA`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ...core import kv as K
from ...registry import register
from .base import KV, KVContext, KVMethod

__all__ = ["TOVA"]


@register("tova", modality="language", integration=KV,
          paper="Oren et al., Transformers are Multi-State RNNs (TOVA), EMNLP 2024",
          equation="evict argmin_i mean_h softmax(q_t K_h^T/sqrt d)_i")
@dataclass
class TOVA(KVMethod):
    """TOVA, Token Omission Via Attention (Oren et al., "Transformers are Multi-State RNNs", 2024), Sec. 3.3.

    Whenever the cache exceeds its budget, drop the entries with the lowest attention from the current query,
    averaged over all heads of the layer, ``s_i = mean_h softmax(q_t K_h^T / sqrt(d))_i`` (one selection per
    layer, shared by the heads); the prompt is reduced the same way with the last prompt token as the query.
    """

    phase: ClassVar[str] = "decode"
    shared_heads: ClassVar[bool] = True
    name: ClassVar[str] = "tova"

    def score(self, ctx: KVContext) -> Tensor:
        return K.last_query_attention(ctx.probs(last=1))
