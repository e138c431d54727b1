"""Knorm on the KV cache: keep the entries with the lowest key norm (see :class:`Knorm`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ...core import kv as K
from ...registry import register
from .base import KV, KVContext, KVMethod

__all__ = ["Knorm"]


@register("knorm", modality="language", integration=KV,
          paper="Devoto et al., A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression, EMNLP 2024",
          equation="keep argtop -||k_i||_2")
@dataclass
class Knorm(KVMethod):
    """Knorm (Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression", EMNLP
    2024): after the prompt keep, per KV head, the entries with the lowest key norm, ``s_i = -||k_i||_2``."""

    name: ClassVar[str] = "knorm"

    def score(self, ctx: KVContext) -> Tensor:
        return K.key_norm_scores(ctx.keys)
