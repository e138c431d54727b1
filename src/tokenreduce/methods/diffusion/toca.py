"""Token-wise feature caching (see :class:`ToCa`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ...core.diffusion import window_bonus
from ...core.errors import check_int
from ...registry import register
from .base import DIFFUSION, DiffusionMethod

__all__ = ["ToCa"]


@register("toca", modality="vision", integration=DIFFUSION,
          paper="Zou et al., Accelerating Diffusion Transformers with Token-wise Feature Caching, ICLR 2025",
          equation="full step every `interval` steps; between: attention output reused, MLP recomputed for the "
                   "top-k of s = ||A_col||-normalised influence + w * steps_cached / interval (+ window bonus)")
@dataclass
class ToCa(DiffusionMethod):
    """ToCa (Zou et al., ICLR 2025; arXiv:2410.05317), Sec. 3, as in its DiT release.

    Every ``interval`` sampling steps (and at the first) all tokens are computed and each block's
    self-attention and MLP outputs cached. In the steps between, a block reuses its cached attention output
    and recomputes the MLP only for the "fresh" tokens, the top ``keep`` fraction (times ToCa's layer and
    step factors when ``schedule``) of the score s = s1 + ``frequency_weight`` * s3: s1 = the attention a token
    received at the last full step (column sums of the attention map, L2-normalised: tokens that influence
    many others are not cached), s3 = steps since the token was last computed / ``interval``; within each
    2x2 window the best token's score is raised by ``local_bonus`` x itself (uniform spatial spread). The
    other tokens keep their cached MLP output. Needs ``scheduler=`` with fixed timesteps (the step index).
    ``keep`` = the mean fraction of tokens whose MLP is recomputed between full steps; 1.0 = no caching.
    """

    interval: int = 3
    schedule: bool = True
    frequency_weight: float = 0.25
    local_bonus: float = 0.6
    caches: ClassVar[bool] = True
    uses_attention: ClassVar[bool] = True  # full steps read ``received`` from their attention probabilities

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("interval", self.interval, 1, "sampling steps from one full step to the next")
        if self.scheduler is None and not self.is_identity:
            raise ValueError("toca caches features across sampling steps and needs scheduler= (a diffusers scheduler "
                             "with fixed timesteps: set_timesteps(n) gives the step index of every forward); got None")

    def full_step(self, step: int) -> bool:
        return step % self.interval == 0

    def fresh_count(self, keep: float, n: int, layer: int, layers: int, step: int, steps: int) -> int:
        """Tokens recomputed in block ``layer`` of ``layers`` at step ``step`` of ``steps``: ToCa's schedule
        keep * (1.8 - 1.6 layer/(L-1)) * (0.6 + 0.8 (step+1)/S) (more in early blocks and late steps; both
        factors average 1), clamped to [1, n]."""
        f = keep
        if self.schedule:
            f *= (1.8 - 1.6 * layer / max(layers - 1, 1)) * (0.6 + 0.8 * (step + 1) / steps)
        return max(1, min(n, round(f * n)))

    def influence(self, received: Tensor) -> Tensor:
        """s1 of every token from the (B, N) attention it received at a full step: L2-normalised over the
        tokens (computed once per full step; the steps until the next one reuse it)."""
        return torch.nn.functional.normalize(received.float(), dim=-1)

    def select(self, influence: Tensor | None, stale: Tensor, grid: tuple[int, int], k: int) -> Tensor | None:
        """(B, k) indices of the fresh tokens (None: the first k, the benchmark's zero-overhead reference)."""
        return self.scores(influence, stale, grid).topk(k, dim=-1).indices

    def scores(self, influence: Tensor | None, stale: Tensor, grid: tuple[int, int]) -> Tensor:
        """(B, N) fresh-token scores s1 + w * s3 from :meth:`influence` and the staleness (+ window bonus)."""
        s = stale.float() * (self.frequency_weight / self.interval)
        if influence is not None:
            s = s + influence
        return window_bonus(s, *grid, self.local_bonus) if self.local_bonus else s
