"""Random baseline before the LLM: a seeded subset of each image's patches (see :class:`RandomVLM`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from ...core import criteria as C
from ...core.state import TokenState
from ...registry import register
from .base import VLM, VlmMethod, top_tokens

__all__ = ["RandomVLM"]


@register("random", modality="multimodal", integration=VLM, paper="random visual-token baseline",
          equation="keep a seeded random subset per image")
@dataclass
class RandomVLM(VlmMethod):
    """Random baseline: a seeded random ``keep`` subset of each image's patches (same draw for every
    image, so a sample keeps the same tokens alone or in a batch). ``keep``: the fraction of each image's
    tokens kept (= of the visual-token work); ``tr.Keep(count=n)``: n tokens per image. No paper preset."""

    seed: int = 0
    positions: str = "compact"
    where: ClassVar[str | None] = "pre"
    label: ClassVar[str] = "random"

    def reduce_image(self, x: Tensor, ctx: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        scores = C.Random(seed=self.seed)(TokenState.from_tensor(x, check=False))
        return top_tokens(x, scores, self.count(x.shape[1]))
