"""What every VLM method shares: what it may know of the model (:class:`ModelInfo`), what an inside-LLM
stage sees and decides (:class:`StageView`, :class:`StageDecision`), the base class :class:`VlmMethod`,
and the budget, layer and selection helpers of the method files. The package docstring
(:mod:`tokenreduce.methods.vlm`) says what ``keep`` means per method.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ...core import ops
from ...core.budget import Keep, KeepLike, validate_keep_value
from ...core.state import batched_index_select

__all__ = [
    "VLM",
    "ModelInfo",
    "StageDecision",
    "StageView",
    "VlmMethod",
    "check_layer",
    "increasing_layers",
    "require_grid",
    "scaled_layers",
    "select_tokens",
    "top_tokens",
]

VLM = "vlm-visual"


@dataclass(frozen=True)
class ModelInfo:
    """What a method may know about the model (filled by the adapter)."""

    depth: int  # LLM decoder layers
    vision_depth: int  # vision encoder layers
    feature_layer: int  # vision layer (0-based) whose output LLaVA uses
    grid: tuple[int, int] | None  # patch grid of one image (None if not a plain grid, e.g. anyres)
    has_cls: bool  # the vision tower has a [CLS] token at index 0
    tokens_per_image: int  # visual tokens per image in the LLM input


@dataclass
class StageView:
    """What an inside-LLM stage sees during prefill (current tokens, after earlier reductions).

    ``attn(layer)`` returns the attention (B, H, Q, L) that ``query`` tokens pay to all current tokens at
    LLM ``layer`` (computed from that layer's own q/k projections for the Q query rows only);
    :meth:`last_query_scores` the last real token's row of it, :meth:`counts` a stage's budget.
    """

    stage: int
    layer: int
    hidden: Tensor  # (B, L, D) input of `layer`
    real: Tensor  # (B, L) bool
    visual: Tensor  # (B, L) bool
    last: Tensor  # (B,) index of the last real token
    index: Tensor  # (B, L) position in the LLM input sequence (-1 for inserted tokens)
    lm_input: Tensor  # (B, L0, D) LLM input embeddings
    lm_visual: Tensor  # (B, L0) bool
    lm_real: Tensor  # (B, L0) bool
    attn: Any  # callable(layer, query_index (B, Q)) -> (B, H, Q, L)
    n_visual0: Tensor  # (B,) visual tokens at the LLM input

    def counts(self, frac: KeepLike, first: bool = True) -> Tensor:
        """Visual tokens kept per sample at this stage: ``frac`` of the LLM-input visual tokens (or a count).
        The first reduction of a sample that has visual tokens may not leave zero (a clear error); later
        pyramid stages may."""
        n_now = self.visual.sum(1)
        if isinstance(frac, int):
            if (n_now < frac).any():
                raise ValueError(f"keep={frac} visual tokens is more than a sample has ({int(n_now.min())})")
            return torch.full_like(n_now, frac)
        k = torch.minimum(torch.round(self.n_visual0.double() * frac).long(), n_now)
        if first and ((k < 1) & (n_now > 0)).any():
            n = int(self.n_visual0[(k < 1) & (n_now > 0)].min())
            raise ValueError(f"keep={frac:.4g} leaves zero of {n} visual tokens; accepted: a ratio >= {0.5 / n:.3g}")
        return k

    def last_query_scores(self, layer: int) -> Tensor:
        """Attention the last real token pays to each current token at ``layer``, mean over heads: (B, L)."""
        p = self.attn(layer, self.last[:, None])  # (B, H, 1, L)
        return p.mean(1)[:, 0]


@dataclass
class StageDecision:
    """Visual tokens to keep (B, L) and optional new tokens (B, E, D) with validity (B, E), inserted after
    the kept visual tokens (SparseVLM's recycled tokens)."""

    keep: Tensor
    extra: Tensor | None = None
    extra_valid: Tensor | None = None


@dataclass
class VlmMethod:
    """Base class. Subclasses set ``where`` ("pre"/"post" for before-the-LLM reductions, None otherwise),
    ``stages`` (LLM layers reduced before, after :meth:`setup`) and ``positions`` ("keep": original position
    ids, "compact": re-indexed contiguously, as the paper's code does; a keyword of the before-the-LLM
    methods and ToDRE, where it covers the placeholders and the text after them)."""

    keep: KeepLike = 1.0
    where: ClassVar[str | None] = None
    positions: ClassVar[str] = "keep"
    needs_vision: ClassVar[frozenset[str]] = frozenset()  # "cls", "mean", "keys"

    def __post_init__(self) -> None:
        if isinstance(self.keep, (list, tuple)):
            raise TypeError(f"{type(self).__name__}: keep must be one float in (0, 1] or int >= 1, got {self.keep!r}")
        validate_keep_value(self.keep)
        if self.positions not in ("compact", "keep"):
            raise ValueError(f"positions={self.positions!r} is invalid: accepted 'compact' (contiguous ids) or "
                             f"'keep' (the ids of the unreduced prompt)")
        self.budget = Keep.of(self.keep)
        self.stages: tuple[int, ...] = ()

    def setup(self, info: ModelInfo) -> None:
        self.info = info

    @property
    def is_identity(self) -> bool:
        return self.budget.is_identity

    def vision_layers(self) -> dict[int, frozenset[str]]:
        """Vision layers whose attention this method needs -> kinds ({"cls", "mean", "keys"})."""
        return {}

    def require_fraction(self, what: str) -> None:
        """A TypeError unless ``keep`` is a float (methods whose ``keep`` is no token count); ``what`` says
        what ``keep`` means for the method."""
        if isinstance(self.keep, int):
            raise TypeError(f"{what}: give a float in (0, 1]")

    def count(self, n: int) -> int:
        """Tokens kept out of ``n`` (before-LLM budget): round(keep * n) or the count; never zero."""
        return _count(self.keep, n)

    # before the LLM
    def reduce_image(self, x: Tensor, ctx: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """(B_img, N, D) -> (tokens (B_img, K, D), source patch index (B_img, K), size (B_img, K))."""
        raise NotImplementedError

    # inside the LLM
    def score_layer(self, stage: int) -> int:
        """LLM layer whose attention scores stage ``stage``."""
        return self.stages[stage] - 1

    def reduce_stage(self, view: StageView) -> StageDecision:
        raise NotImplementedError


# ---------------------------------------------------------------------------- budgets and layers
def _count(keep: float, n: int) -> int:
    """round(keep * n) for a ratio, ``keep`` for a count; a clear error when that leaves no token or asks
    for more than there are (nothing is silently clipped)."""
    if isinstance(keep, int):
        if keep > n:
            raise ValueError(f"keep={keep} visual tokens is more than the {n} there are (accepted: 1..{n})")
        return keep
    k = round(keep * n)
    if k < 1:
        raise ValueError(f"keep={keep} leaves zero of {n} visual tokens; accepted: a ratio >= {0.5 / n:.3g} "
                         f"or a count in 1..{n}")
    return k


def require_grid(info: ModelInfo, name: str) -> None:
    """A ValueError unless the model's image tokens form one patch grid (methods that need the grid)."""
    if info.grid is None:
        raise ValueError(f"{name} needs a plain patch grid (LLaVA-1.5 style); this model's image tokens are not one grid")


def check_layer(layer: int, depth: int, name: str, low: int = 1) -> int:
    """``layer`` if it is an int in ``low..depth-1``, else a TypeError/ValueError naming ``name``."""
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"{name} must be an int layer index, got {layer!r}")
    if not low <= layer < depth:
        raise ValueError(f"{name}={layer} is out of range: this LLM has {depth} decoder layers, accepted {low}..{depth - 1}")
    return layer


def increasing_layers(layers: Sequence[int], depth: int, low: int = 1) -> tuple[int, ...]:
    """``layers`` as a tuple, each checked by :func:`check_layer` (as ``layers[i]``), distinct and increasing."""
    layers = tuple(layers)
    for l in layers:
        check_layer(l, depth, "layers[i]", low=low)
    if list(layers) != sorted(set(layers)):
        raise ValueError(f"layers must be distinct and increasing, got {list(layers)}")
    return layers


def scaled_layers(layers: Sequence[int], of: int, depth: int, low: int = 1) -> tuple[int, ...]:
    """Paper layer indices for a ``of``-layer LLM scaled to ``depth`` layers (distinct, in [low, depth-1])."""
    out = sorted({min(max(low, round(l * depth / of)), depth - 1) for l in layers})
    return tuple(out)


# ---------------------------------------------------------------------------- before the LLM: selections
def select_tokens(x: Tensor, keep: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The tokens ``keep`` (B, N) marks (the same count in every image), in order:
    (tokens (B, K, D), source patch index (B, K), size (B, K) = 1)."""
    idx, _ = ops.compact(keep)
    return batched_index_select(x, idx), idx, torch.ones(idx.shape, device=x.device)


def top_tokens(x: Tensor, scores: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The ``k`` best-scored tokens (B, N) of every image, in order (ties: lower index); see :func:`select_tokens`."""
    B, N = scores.shape
    valid = torch.ones(B, N, dtype=torch.bool, device=x.device)
    return select_tokens(x, ops.masked_topk(scores, valid, torch.full((B,), k)))
