"""Vision methods for ViT layers: each is a short composition of a criterion, a strategy and a budget.

A :class:`VisionMethod` tells the ViT adapter (``adapters/vit.py``) at which blocks it reduces, what
attention-derived context it needs there (``metric`` = keys summed over heads, ToMe's mean up to 1/H, used
only scale-invariantly; ``cls_attn`` = the CLS row of the attention averaged over heads; both computed from
the block's own q/k projections, so the model keeps its SDPA/eager attention), and whether merged tokens get
proportional attention.
The reduction happens inside a block, after attention and before the MLP, as in ToMe and EViT.

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
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..core import criteria as C
from ..core import strategies as S
from ..core.budget import Keep, KeepLike
from ..core.state import TokenState
from ..registry import register_dataclass

__all__ = [
    "ClusterMerge",
    "EViT",
    "Pool",
    "RandomPrune",
    "ToMe",
    "TokenTransforming",
    "VisionMethod",
    "default_stage_layers",
]

VIT = "vit-layers"


def default_stage_layers(depth: int) -> tuple[int, ...]:
    """EViT's reduction points (blocks 4, 7, 10 of 12, 1-based) scaled to ``depth``: 0-based d/4, d/2, 3d/4."""
    return tuple(sorted({max(1, round(depth * f)) for f in (0.25, 0.5, 0.75)} - {depth}))


@dataclass
class VisionMethod:
    """Base class: a reduction plan over the blocks of a ViT."""

    keep: KeepLike = 1.0
    prop_attn: bool = False
    needs: frozenset[str] = field(default_factory=frozenset)

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
class _StageMethod(VisionMethod):
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


# ---------------------------------------------------------------------------- ToMe
@dataclass
class ToMe(VisionMethod):
    """Token Merging (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023).

    In every block, after attention: bipartite soft matching on the keys averaged over heads (Sec. 3,
    "Bipartite Soft Matching"), merge the ``r`` most similar pairs by size-weighted average, and use
    proportional attention softmax(QK^T/sqrt(d) + log s) (Eq. 1) in later blocks.
    ``r`` (tokens per block, ToMe's knob; capped per block at the bipartite maximum, as in ToMe's code,
    and reported in stats) or ``keep`` (final fraction of reducible tokens; the removals are spread
    evenly over the blocks, front-loaded, never more than a block can merge).
    """

    r: int | None = None
    prop_attn: bool = True
    needs: frozenset[str] = frozenset({"metric"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r is not None:
            if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 0:
                raise ValueError(f"r must be an int >= 0 (tokens merged per block), got {self.r!r}")
            if self.keep != 1.0:
                raise ValueError("give either r= (tokens merged per block) or keep= (final fraction), not both")

    @property
    def is_identity(self) -> bool:
        return self.r == 0 if self.r is not None else self.budget.is_identity

    def reduces_at(self, layer: int) -> bool:
        return not self.is_identity

    def _target(self, state: TokenState) -> Tensor:
        """Per-sample final reducible count, computed once at block 0."""
        return self.budget.counts(state.reducible_counts())

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
            if layer == self.depth - 1 and (need > r).any():
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


# ---------------------------------------------------------------------------- EViT
@dataclass
class EViT(_StageMethod):
    """EViT (Liang et al., "Not All Patches are What You Need", ICLR 2022).

    At the stage blocks, after attention: keep the ``keep`` fraction of tokens with the largest CLS
    attention averaged over heads (Eq. 3) and fuse the rest into one token x = sum_i a_i x_i (Eq. 4;
    ``normalize_fused=True`` uses the weighted mean instead).
    """

    normalize_fused: bool = False
    needs: frozenset[str] = frozenset({"cls_attn"})

    def reduce(self, layer: int, state: TokenState, ctx: dict[str, Tensor]) -> TokenState:
        scores = C.Attention("cls")(state, **ctx)
        return S.prune_package(state, scores, self.counts(layer, state, scores), normalize=self.normalize_fused)


# ---------------------------------------------------------------------------- Token Transforming
@dataclass
class TokenTransforming(_StageMethod):
    """Token Transforming (Zeng, Yu, Kong, Tang, arXiv:2506.05709, 2025): reduction as X' = T X with a
    many-to-many matrix T. Targets are the most informative tokens by CLS attention; every other token is
    spread over its ``topk`` most similar targets (keys, softmax with temperature ``tau``); see
    :func:`tokenreduce.core.strategies.transform` for the equations. Proportional attention on.
    """

    topk: int = 4
    tau: float = 0.1
    prop_attn: bool = True
    needs: frozenset[str] = frozenset({"cls_attn", "metric"})

    def reduce(self, layer: int, state: TokenState, ctx: dict[str, Tensor]) -> TokenState:
        scores = C.Attention("cls")(state, **ctx)
        return S.transform(state, ctx["metric"], self.counts(layer, state, scores), scores, topk=self.topk,
                           tau=self.tau)


# ---------------------------------------------------------------------------- clustering
@dataclass
class ClusterMerge(_StageMethod):
    """Token clustering (TCFormer's clustering-based token merge, Zeng et al., CVPR 2022, Eq. 1-4):
    DPC-KNN centers on the token features, each token merged into its nearest center (size-weighted),
    ``algo="kmeans"`` refines with k-means. Proportional attention on."""

    algo: str = "dpc-knn"
    k: int = 5
    prop_attn: bool = True

    def reduce(self, layer: int, state: TokenState, ctx: dict[str, Tensor]) -> TokenState:
        return S.cluster_merge(state, state.x, self.counts(layer, state), algo=self.algo, k=self.k)


# ---------------------------------------------------------------------------- baselines
@dataclass
class Pool(_StageMethod):
    """Spatial average-pooling baseline: at each stage pool the patch grid to about ``keep`` of its cells
    (adaptive bins, size-weighted; the CLS token untouched). Proportional attention on."""

    prop_attn: bool = True

    def reduce(self, layer: int, state: TokenState, ctx: dict[str, Tensor]) -> TokenState:
        return S.pool(state, self.counts(layer, state))


@dataclass
class RandomPrune(_StageMethod):
    """Random pruning baseline: at each stage keep a random ``keep`` fraction of the tokens (``seed``)."""

    seed: int = 0

    def reduce(self, layer: int, state: TokenState, ctx: dict[str, Tensor]) -> TokenState:
        scores = C.Random(seed=self.seed * 1000 + layer)(state)
        return S.prune(state, scores, self.counts(layer, state, scores))


# ---------------------------------------------------------------------------- registration
def _reg(name: str, cls: type, paper: str, equation: str) -> None:
    register_dataclass(name, cls, modality="vision", integration=VIT, paper=paper, equation=equation)


_reg("tome", ToMe, "Bolya et al., Token Merging: Your ViT But Faster, ICLR 2023",
     "bipartite soft matching on keys; x=sum s_i x_i/sum s_i; softmax(QK^T/sqrt(d)+log s)")
_reg("evit", EViT, "Liang et al., Not All Patches are What You Need (EViT), ICLR 2022",
     "top-k by mean_h A[cls,i]; x_fused=sum_{i inattentive} a_i x_i")
_reg("token-transforming", TokenTransforming,
     "Zeng et al., Token Transforming: A Unified and Training-Free Token Compression Framework, 2025",
     "X'=TX, T_ji=softmax_j(cos(k_i,k_j)/tau) over top-k targets")
_reg("cluster", ClusterMerge, "Zeng et al., TCFormer (DPC-KNN token clustering), CVPR 2022",
     "rho_i=exp(-mean_kNN d^2), delta_i=min_{rho_j>rho_i} d_ij, centers=top rho*delta")
_reg("pool", Pool, "spatial average pooling baseline", "adaptive avg-pool of the patch grid")
_reg("random", RandomPrune, "random pruning baseline", "keep a seeded random subset")
