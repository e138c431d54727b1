"""ToMe on ViT layers: bipartite soft matching in every block (see :class:`ToMe`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ...core import strategies as S
from ...core.state import TokenState
from ...registry import register
from .base import VIT, VisionMethod, fit_work

__all__ = ["ToMe"]


@register("tome", modality="vision", integration=VIT, paper="Bolya et al., Token Merging: Your ViT But Faster, ICLR 2023",
          budget_knobs=("r",),
          equation="bipartite soft matching on keys; x=sum s_i x_i/sum s_i; softmax(QK^T/sqrt(d)+log s)")
@dataclass
class ToMe(VisionMethod):
    """Token Merging (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023).

    In every block, after attention: bipartite soft matching on the keys averaged over heads (Sec. 3,
    "Bipartite Soft Matching"), merge the ``r`` most similar pairs by size-weighted average, and use
    proportional attention softmax(QK^T/sqrt(d) + log s) (Eq. 1) in later blocks.
    ``keep`` (the fraction of the token-block work kept, as for every ViT method): the removals are spread
    evenly over the blocks (ToMe's constant r), front-loaded, never more than a block can merge, towards the
    final count whose work is closest to ``keep``; ``tr.Keep(count=n)`` fixes the final count instead. Or ``r``
    (tokens per block, ToMe's own knob; capped per block at the bipartite maximum, as in ToMe's code, and
    reported in stats).
    """

    r: int | None = None
    prop_attn: bool = True
    needs: ClassVar[frozenset[str]] = frozenset({"metric"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r is not None:
            if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 0:
                raise ValueError(f"r must be an int >= 0 (tokens merged per block), got {self.r!r}")
            if self.keep != 1.0:
                raise ValueError("give either r= (tokens merged per block) or keep=, not both")

    @property
    def is_identity(self) -> bool:
        return self.r == 0 if self.r is not None else self.budget.is_identity

    def reduces_at(self, layer: int) -> bool:
        return not self.is_identity

    def plan(self, protected: int, start: int, final: int) -> list[int]:
        """Reducible tokens after each block when ``start`` are merged towards ``final``: each block removes
        ceil(still to remove / blocks left), at most what bipartite matching can merge (the runtime rule)."""
        after, n = [], start
        for layer in range(self.depth):
            a = (protected + n + 1) // 2 - (protected + 1) // 2
            cap = a if n - a > 0 else 0
            left = self.depth - layer
            n -= max(0, min(-(-(n - final) // left), cap))
            after.append(n)
        return after

    def _target(self, state: TokenState) -> Tensor:
        """Per-sample final reducible count, computed once at block 0: a count budget's count, or the final
        count whose planned work is closest to a fraction keep."""
        if self.budget.fraction is None:
            return self.budget.counts(state.reducible_counts())
        finals: dict[int, int] = {}
        starts = state.reducible_counts().tolist()
        for start in starts:
            if start == 0:  # nothing to reduce (an all-padding row)
                finals[0] = 0
            if start not in finals:
                k = fit_work(getattr(self, "label", "tome"), float(self.budget.fraction), (1.0, float(max(start, 1))),
                             lambda f, s=start: self.plan(state.protected, s, round(f)), state.protected, start,
                             f"ToMe removes the same number of tokens in each of the {self.depth} blocks (the paper's "
                             f"constant r)", None if start == max(starts) else self.notes)
                finals[start] = round(k)
        return torch.tensor([finals[s] for s in state.reducible_counts().tolist()], device=state.x.device)

    def reduce(self, layer: int, state: TokenState, ctx: dict[str, Tensor]) -> TokenState:
        n = state.reducible_counts()
        possible = _bipartite_capacity(state)
        if self.r is not None:
            r = torch.minimum(torch.full_like(n, self.r), possible)
            if bool((r < self.r).any()):
                self.notes.append(f"block {layer}: r capped at the bipartite maximum {r.min().item()} < r={self.r}")
        else:
            if layer == 0 or getattr(self, "_final", None) is None or self._final.shape != n.shape:
                self._final = self._target(state)
            left = self.depth - layer
            need = n - self._final
            r = torch.minimum((need + left - 1) // left, possible).clamp(min=0)
            if layer == self.depth - 1 and (need > r).any() and self.budget.fraction is None:
                raise ValueError(
                    f"keep={self.keep} is too small for ToMe on this model: bipartite matching merges at most half "
                    f"of the tokens per block over {self.depth} blocks (left {n.tolist()}, target "
                    f"{self._final.tolist()}); use a larger keep"
                )
        if not (r > 0).any():
            return state
        return S.bipartite_merge(state, ctx["metric"], n - r)


def _bipartite_capacity(state: TokenState) -> Tensor:
    """Reducible tokens in set A (even indices) that have a reducible partner in B (odd indices)."""
    p = state.protected
    n = state.reducible_counts()
    a = (p + n + 1) // 2 - (p + 1) // 2
    b = n - a
    return torch.where(b > 0, a, torch.zeros_like(a))
