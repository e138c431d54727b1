"""Average-pooling baseline on the projected patch grid, before the LLM (see :class:`PoolVLM`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ...core import strategies as S
from ...core.state import TokenState
from ...registry import register
from .base import VLM, ModelInfo, VlmMethod, require_grid

__all__ = ["PoolVLM"]


@register("pool", modality="multimodal", integration=VLM, paper="average-pooling baseline (visual tokens)",
          equation="adaptive avg-pool of the projected patch grid")
@dataclass
class PoolVLM(VlmMethod):
    """Average-pooling baseline: the projected patch grid pooled to about ``keep`` of its cells (adaptive
    non-overlapping bins, :func:`tokenreduce.core.strategies.pool`); a pooled token's position (with
    ``positions="keep"``) is its bin's first patch."""

    positions: str = "compact"
    where: ClassVar[str | None] = "post"

    def setup(self, info: ModelInfo) -> None:
        super().setup(info)
        require_grid(info, "pool")

    def reduce_image(self, x: Tensor, ctx: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        st = TokenState.from_tensor(x, grid=self.info.grid, check=False)
        out = S.pool(st, torch.full((x.shape[0],), self.count(x.shape[1])))
        return out.x, out.source, out.size
