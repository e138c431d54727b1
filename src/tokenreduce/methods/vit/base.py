"""What every ViT-layer method shares: the reduction plan over a ViT's blocks and the stage budget.

A :class:`VisionMethod` tells the ViT adapter (``adapters/vit.py``) at which blocks it reduces, what
attention-derived context it needs there (``metric`` = keys summed over heads, ToMe's mean up to 1/H, used
only scale-invariantly; ``cls_attn`` = the CLS row of the attention averaged over heads; both computed from
the block's own q/k projections, so the model keeps its SDPA/eager attention), and whether merged tokens get
proportional attention. The reduction happens inside a block, after attention and before the MLP, as in
ToMe and EViT.

``keep`` semantics (documented per method, reported as real token counts in ``Handle.stats``):

* ``tome``: fraction (or count) of the reducible tokens left after the last block, removed evenly over
  the blocks; or ToMe's own ``r`` tokens merged per block.
* stage methods (``evit``, ``token-transforming``, ``cluster``, ``pool``, ``random``): fraction (or count)
  of the reducible tokens kept at each reduction stage (EViT's "keep rate"); ``layers=`` picks the stages
  (default: after 1/4, 1/2 and 3/4 of the depth, EViT's 4th/7th/10th of 12 blocks); a list gives one
  keep per stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ...core.budget import Keep, KeepLike
from ...core.state import TokenState

__all__ = ["VIT", "StageMethod", "VisionMethod", "default_stage_layers"]

VIT = "vit-layers"


def default_stage_layers(depth: int) -> tuple[int, ...]:
    """EViT's reduction points (blocks 4, 7, 10 of 12, 1-based) scaled to ``depth``: 0-based d/4, d/2, 3d/4."""
    return tuple(sorted({max(1, round(depth * f)) for f in (0.25, 0.5, 0.75)} - {depth}))


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

    def reduces_at(self, layer: int) -> bool:
        return not self.is_identity and layer in self._stage

    def counts(self, layer: int, state: TokenState, scores: Tensor | None = None) -> Tensor:
        if self.budget.threshold is not None and scores is None:
            raise ValueError(f"{type(self).__name__} has no token scores, so it cannot take a threshold budget; "
                             f"use a ratio or a count")
        return self.budget.counts(state.reducible_counts(), scores=scores, valid=state.reducible(),
                                  stage=self._stage[layer] if self.budget.num_stages else 0)
