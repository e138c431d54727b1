"""What every ViT-layer method shares: the reduction plan over a ViT's blocks and the stage budget.

A :class:`VisionMethod` tells the ViT adapter (``adapters/vit.py``) at which blocks it reduces, what
attention-derived context it needs there (``metric`` = keys summed over heads, ToMe's mean up to 1/H, used
only scale-invariantly; ``cls_attn`` = the CLS row of the attention averaged over heads; both computed from
the block's own q/k projections, so the model keeps its SDPA/eager attention), and whether merged tokens get
proportional attention. The reduction happens inside a block, after attention and before the MLP, as in
ToMe and EViT.

``keep`` (a float) is the same for every method here: the **fraction of the token-block work kept**, the mean
over the blocks' attention and MLP halves of the tokens they process, over the input tokens
(:func:`~tokenreduce.core.budget.layer_work`). Each method maps it onto its paper's own schedule, the
knob fitted per sample so that the planned work is the closest one to ``keep``
(:func:`~tokenreduce.core.budget.closest_plan`); ``Handle.stats.keep_achieved`` reports what ran:

* ``tome``: tokens removed evenly over the blocks (ToMe's constant r, front-loaded, capped at what bipartite
  matching can merge per block); the knob is the final token count. ``r=`` gives ToMe's own per-block r.
* stage methods (``evit``, ``token-transforming``, ``cluster``, ``pool``, ``random``): the same fraction of the
  reducible tokens kept at each stage (EViT's "keep rate"); the knob is that rate. ``layers=`` picks the stages
  (default: after 1/4, 1/2 and 3/4 of the depth, EViT's 4th/7th/10th of 12 blocks).

A keep below the least work a schedule can reach (stage methods process every token up to their first stage)
is an error naming the reachable range. The papers' own budgets stay reachable: ``tr.Keep([0.7, 0.7, 0.7])``
is EViT's per-stage keep rate, ``tr.Keep(count=n)`` a token count per stage (ToMe: after the last block),
``tr.Keep(threshold=t)`` a score threshold.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ...core.budget import Keep, KeepLike, closest_plan, layer_work
from ...core.state import TokenState

__all__ = ["VIT", "StageMethod", "VisionMethod", "default_stage_layers", "fit_work"]

VIT = "vit-layers"


def default_stage_layers(depth: int) -> tuple[int, ...]:
    """EViT's reduction points (blocks 4, 7, 10 of 12, 1-based) scaled to ``depth``: 0-based d/4, d/2, 3d/4."""
    return tuple(sorted({max(1, round(depth * f)) for f in (0.25, 0.5, 0.75)} - {depth}))


def fit_work(name: str, keep: float, knob: tuple[float, float], after: Callable[[float], list[int]],
             protected: int, start: int, where: str, notes: list[str] | None = None) -> float:
    """The knob in ``knob`` (lo, hi) whose schedule ``after(knob)`` keeps the work closest to ``keep``.

    When ``keep`` is clearly below the least work the schedule reaches (``where``: why): a ValueError naming
    the reachable range, or, with ``notes`` (a shorter sample of a padded batch, whose few tokens cannot be
    split finely enough), the least plan and a note."""
    def work(k: float) -> float:
        return layer_work(protected, start, after(k))

    least = work(knob[0])
    if keep < 0.95 * least:
        if notes is None:
            raise ValueError(f"{name}: keep={keep} is below the least token-block work it can keep on this input "
                             f"({least:.3f}: {where}); accepted: keep in [{least:.3f}, 1]")
        notes.append(f"{name}: a sample of {protected + start} tokens cannot keep less than {least:.3f} of its "
                     f"token-block work (keep={keep}); it keeps {least:.3f}")
        return knob[0]
    return closest_plan(work, keep, *knob)[0]


@dataclass
class VisionMethod:
    """Base class: a reduction plan over the blocks of a ViT. ``needs``: the context tensors the adapter
    computes at the reducing blocks ("metric", "cls_attn")."""

    keep: KeepLike = 1.0
    prop_attn: bool = False
    needs: ClassVar[frozenset[str]] = frozenset()

    def __post_init__(self) -> None:
        self.budget = Keep.of(self.keep)
        self.notes: list[str] = []  # reset by the adapter each forward, copied into Handle.stats.notes

    # the adapter calls these ------------------------------------------------
    def setup(self, depth: int) -> None:
        """Called once with the model depth (number of blocks)."""
        self.depth = depth

    @property
    def is_identity(self) -> bool:
        return self.budget.is_identity

    def reduces_at(self, layer: int) -> bool:
        raise NotImplementedError

    def reduce(self, layer: int, state: TokenState, ctx: dict[str, Tensor]) -> TokenState:
        raise NotImplementedError


@dataclass
class StageMethod(VisionMethod):
    """A method that reduces at a few stage blocks (``layers``), keeping ``keep`` of the tokens at each."""

    layers: Sequence[int] | None = None

    def setup(self, depth: int) -> None:
        super().setup(depth)
        layers = tuple(self.layers) if self.layers is not None else default_stage_layers(depth)
        bad = [l for l in layers if not 0 <= l < depth]
        if bad:
            raise ValueError(f"layers {bad} out of range: a model with {depth} blocks accepts 0..{depth - 1}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers must be distinct, got {list(layers)}")
        n = self.budget.num_stages
        if n is not None and n != len(layers):
            raise ValueError(f"keep schedule has {n} stages but the method reduces at {len(layers)} layers {layers}")
        self._stage = {l: i for i, l in enumerate(sorted(layers))}
        self._plan: Tensor | None = None

    def reduces_at(self, layer: int) -> bool:
        return not self.is_identity and layer in self._stage

    # -- keep as a fraction of work: one per-stage keep rate per sample, fitted to it
    def tokens_after(self, n: int, count: int, grid: tuple[int, int] | None) -> tuple[int, tuple[int, int] | None]:
        """Reducible tokens (and grid) after a stage that keeps ``count`` of ``n`` (EViT adds a package token,
        pooling rounds to a grid)."""
        return count, None

    def stage_counts(self, start: int, rate: float, grid: tuple[int, int] | None = None) -> list[int]:
        """The count each stage keeps for ``start`` reducible tokens and keep rate ``rate`` (the rounding of
        ``Keep(rate).counts``)."""
        out, n = [], start
        for _ in self._stage:
            c = min(n, max(1, round(n * rate))) if n else 0
            out.append(c)
            n, grid = self.tokens_after(n, c, grid)
        return out

    def _after_blocks(self, start: int, rate: float, grid: tuple[int, int] | None) -> list[int]:
        counts = self.stage_counts(start, rate, grid)
        after, n = [], start
        for layer in range(self.depth):
            if layer in self._stage:
                n, grid = self.tokens_after(n, counts[self._stage[layer]], grid)
            after.append(n)
        return after

    def _fit_plan(self, state: TokenState) -> Tensor:
        """(B, stages) counts: per sample, the stage counts of the keep rate whose work is closest to keep."""
        keep = float(self.budget.fraction)  # type: ignore[arg-type]
        rows: dict[int, list[int]] = {}
        starts = state.reducible_counts().tolist()
        for start in starts:
            if start == 0:  # nothing to reduce (an all-padding row)
                rows[0] = [0] * len(self._stage)
            if start not in rows:
                first = min(self._stage)
                rate = fit_work(getattr(self, "label", type(self).__name__), keep, (1e-6, 1.0),
                                lambda r, s=start: self._after_blocks(s, r, state.grid), state.protected, start,
                                f"every token is processed up to the first stage, block {first} of {self.depth}; "
                                f"move it earlier with layers=", None if start == max(starts) else self.notes)
                rows[start] = self.stage_counts(start, rate, state.grid)
        return torch.tensor([rows[s] for s in state.reducible_counts().tolist()], dtype=torch.long,
                            device=state.x.device)

    def counts(self, layer: int, state: TokenState, scores: Tensor | None = None) -> Tensor:
        stage = self._stage[layer]
        if self.budget.fraction is not None:  # one fraction: keep as a fraction of the token-block work
            if stage == 0 or self._plan is None or self._plan.shape[0] != state.batch:
                self._plan = self._fit_plan(state)
            return self._plan[:, stage]
        if self.budget.threshold is not None and scores is None:
            raise ValueError(f"{type(self).__name__} has no token scores, so it cannot take a threshold budget; "
                             f"use a ratio or a count")
        return self.budget.counts(state.reducible_counts(), scores=scores, valid=state.reducible(),
                                  stage=self._stage[layer] if self.budget.num_stages else 0)
