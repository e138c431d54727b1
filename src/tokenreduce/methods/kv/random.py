"""Random baseline on the KV cache: a seeded random subset per KV head (see :class:`RandomKV`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ...core import kv as K
from ...registry import register
from .base import KV, KVContext, KVMethod

__all__ = ["RandomKV"]


@register("random", modality="language", integration=KV, paper="random baseline",
          equation="keep a seeded random subset per head")
@dataclass
class RandomKV(KVMethod):
    """Random baseline: after the prompt keep a seeded random subset per KV head (``seed``); scores depend only
    on (seed, layer, head, position in the sample), so a sample keeps the same entries alone or in a batch."""

    seed: int = 0
    name: ClassVar[str] = "random"

    def score(self, ctx: KVContext) -> Tensor:
        return K.positional_random_scores(ctx.rel, self.seed, salt=ctx.layer)
