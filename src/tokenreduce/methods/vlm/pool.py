"""Average-pooling baseline on the projected patch grid, before the LLM (see :class:`PoolVLM`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ...core import strategies as S
from ...core.state import TokenState
from ...registry import register
from .base import VLM, ModelInfo, VlmMethod, image_count, require_grid

__all__ = ["PoolVLM"]


@register("pool", modality="multimodal", integration=VLM, paper="average-pooling baseline (visual tokens)",
          equation="adaptive avg-pool of the projected patch grid")
@dataclass
class PoolVLM(VlmMethod):
    """Average-pooling baseline: the projected patch grid pooled to a coarser grid (adaptive
    non-overlapping bins, :func:`tokenreduce.core.strategies.pool`); a pooled token's position (with
    ``positions="keep"``) is its bin's first patch.

    ``keep``: the fraction of each image's tokens kept (= of the visual-token work): the coarser grid whose
    cell count is closest to keep x N (a grid keeps the aspect ratio, so not every count is a grid);
    ``tr.Keep(count=n)``: the grid for about n cells (``Handle.stats.notes`` says when it is not exactly n).
    No paper preset."""

    positions: str = "compact"
    where: ClassVar[str | None] = "post"
    label: ClassVar[str] = "pool"

    def setup(self, info: ModelInfo) -> None:
        super().setup(info)
        require_grid(info, "pool")

    def count(self, n: int) -> int:
        want = image_count(self.keep, n)
        cells = {c: _cells(self.info.grid, c) for c in range(1, n + 1)}
        if isinstance(self.keep, int):
            if cells[want] != want:
                self.note(f"pool: Keep(count={want}) pools each image to the nearest grid, {cells[want]} cells")
            return want
        target = self.keep * n
        return min(cells, key=lambda c: (abs(cells[c] - target), c))

    def kept_per_image(self, n: int) -> int:
        return _cells(self.info.grid, self.count(n))

    def reduce_image(self, x: Tensor, ctx: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        st = TokenState.from_tensor(x, grid=self.info.grid, check=False)
        out = S.pool(st, torch.full((x.shape[0],), self.count(x.shape[1])))
        return out.x, out.source, out.size


def _cells(grid: tuple[int, int], count: int) -> int:
    """Cells of the grid :func:`~tokenreduce.core.strategies.pool` uses for about ``count`` tokens."""
    oh, ow = S.grid_for_count(grid, count)
    return oh * ow
