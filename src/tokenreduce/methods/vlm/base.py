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
from ...core.budget import Keep, KeepLike, closest_plan, validate_keep_value
from ...core.state import batched_index_select
from ...core.visual import staged_counts, visual_work

__all__ = [
    "VLM",
    "ModelInfo",
    "StageDecision",
    "StageView",
    "VlmMethod",
    "check_layer",
    "image_count",
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
    :meth:`last_query_scores` the last real token's row of it. A stage's budget is the method's
    :meth:`VlmMethod.stage_counts`.
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
    methods and ToDRE, where it covers the placeholders and the text after them).

    ``keep`` (see :mod:`tokenreduce.methods.vlm`): a float is the fraction of the visual-token work in the LLM
    kept; ``Keep(count=n)`` (an int here) visual tokens per image, for methods with ``takes_count``; a
    ``Keep([...])`` schedule the method's own terms (``own_terms`` says what they are; "" = refused).
    Inside-LLM methods plan per sample (:meth:`plan`): a fraction is fitted by the method's knob
    (:meth:`stage_fractions` over ``knob_range``) so that the planned work (:func:`~tokenreduce.core.visual.visual_work`)
    is the closest to ``keep``; ``notes`` collects what a budget could not honour exactly (the adapter moves
    them into ``Handle.stats.notes``)."""

    keep: KeepLike = 1.0
    where: ClassVar[str | None] = None
    positions: ClassVar[str] = "keep"
    needs_vision: ClassVar[frozenset[str]] = frozenset()  # "cls", "mean", "keys"
    #: a before-the-LLM method that reads the prompt: ``reduce_image`` gets ``ctx["question"]`` = (text token
    #: embeddings (n_img, L, D) in the LLM's input space, mask (n_img, L)) of each image's own prompt
    needs_question: ClassVar[bool] = False
    label: ClassVar[str] = "vlm method"  # the registered name, for messages
    takes_count: ClassVar[bool] = True
    own_terms: ClassVar[str] = ""
    knob_range: ClassVar[tuple[float, float]] = (0.0, 1.0)
    least_hint: ClassVar[str] = ""  # how to reach less work (for the error message)

    def __post_init__(self) -> None:
        self._check_keep()
        if self.positions not in ("compact", "keep"):
            raise ValueError(f"positions={self.positions!r} is invalid: accepted 'compact' (contiguous ids) or "
                             f"'keep' (the ids of the unreduced prompt)")
        self.budget = Keep.of(self.keep)
        self.stages: tuple[int, ...] = ()
        self.notes: list[str] = []
        self._plans: dict[int, tuple[tuple[int, ...], tuple[str, ...]]] = {}

    def _check_keep(self) -> None:
        keep, name = self.keep, self.label
        if isinstance(keep, (list, tuple)):
            raise TypeError(f"{name}: keep must be one float in (0, 1] or tr.Keep(...), got {keep!r}")
        if isinstance(keep, Keep):
            if keep.threshold is not None or keep.count is not None:
                raise TypeError(f"{name}: {keep!r} is not accepted: give keep as a float (the fraction of the "
                                f"visual-token work kept)" + (" or tr.Keep(count=n) (visual tokens per image)"
                                                              if self.takes_count else ""))
            if not self.own_terms:
                raise TypeError(f"{name}: a keep schedule {keep!r} has no meaning here (one reduction before the "
                                f"LLM): give a float (the fraction of each image's visual tokens kept) or "
                                f"tr.Keep(count=n)")
            return
        validate_keep_value(keep)
        if isinstance(keep, int) and not self.takes_count:
            raise TypeError(f"{name}: tr.Keep(count={keep}) has no meaning here ({name} prunes a sample's visual "
                            f"tokens together inside the LLM, not per image): give keep as a float (the fraction "
                            f"of the visual-token work kept) or tr.Keep([...]) ({self.own_terms})")

    def setup(self, info: ModelInfo) -> None:
        self.info = info
        self._plans.clear()

    def check_budget(self) -> None:
        """Called by the adapter after :meth:`setup`: a budget this model cannot honour fails here, before
        anything is patched (on models with a fixed number of tokens per image)."""
        if self.is_identity or self.info.tokens_per_image <= 0:
            return
        if self.where is not None:  # before the LLM (ToDRE's stage 2 has no budget of its own)
            self.count(self.info.grid[0] * self.info.grid[1] if self.info.grid else self.info.tokens_per_image)
        elif self.stages:
            self.plan(self.info.tokens_per_image)

    @property
    def is_identity(self) -> bool:
        return self.budget.is_identity

    @property
    def fraction(self) -> float | None:
        """The requested fraction of the visual-token work (None for counts and schedules)."""
        return self.budget.fraction

    def take_notes(self) -> list[str]:
        """The notes since the last call (the adapter moves them into the prefill's stats)."""
        out, self.notes = self.notes, []
        return out

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def vision_layers(self) -> dict[int, frozenset[str]]:
        """Vision layers whose attention this method needs -> kinds ({"cls", "mean", "keys"})."""
        return {}

    # before the LLM
    def count(self, n: int) -> int:
        """Tokens kept out of an image's ``n`` (before-LLM budget): round(keep * n) or the count; never zero."""
        return image_count(self.keep, n)

    def kept_per_image(self, n: int) -> int:
        """Tokens an image of ``n`` has after the reduction (pooling rounds :meth:`count` to a grid)."""
        return self.count(n)

    def reduce_image(self, x: Tensor, ctx: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """(B_img, N, D) -> (tokens (B_img, K, D), source patch index (B_img, K), size (B_img, K))."""
        raise NotImplementedError

    # inside the LLM: the per-sample plan
    def stage_fractions(self, knob: float) -> list[float]:
        """The fraction of the LLM-input visual tokens each stage keeps for a knob in ``knob_range`` (the
        method's own schedule; non-increasing over stages, non-decreasing in the knob)."""
        raise NotImplementedError

    def visual_after(self, n0: int, kept: tuple[int, ...]) -> tuple[int, ...]:
        """Visual tokens after each stage when it keeps ``kept`` (SparseVLM adds its merged tokens)."""
        return kept

    def least_reason(self) -> str:
        """Why a schedule cannot keep less work (for the error message)."""
        first = self.stages[0]
        before = f"layers 0-{first - 1} (of {self.info.depth}) process" if first > 1 else \
            f"layer 0 (of {self.info.depth}) processes"
        return f"{before} every visual token, the later ones at least one per image" + \
            (self.least_hint if first > 1 else "")

    def floor(self, n0: int) -> int:
        """Fewest visual tokens a stage may leave a sample: one per image (one per sample if images have no
        fixed token count)."""
        per = self.info.tokens_per_image
        return max(1, n0 // per) if per > 0 else 1

    def plan(self, n0: int) -> tuple[int, ...]:
        """Visual tokens each stage keeps for a sample with ``n0`` at the LLM input (cached per ``n0``); the
        plan's notes are added to :attr:`notes` each time it is used."""
        if n0 not in self._plans:
            self._plans[n0] = self._make_plan(n0)
        counts, notes = self._plans[n0]
        for t in notes:
            self.note(t)
        return counts

    def planned_work(self, n0: int) -> float:
        """The visual-token work planned for a sample with ``n0`` visual tokens at the LLM input (before the
        LLM: each image's kept share, up to ToDRE's drop layer)."""
        if self.where is not None:
            n = self.info.grid[0] * self.info.grid[1] if self.info.grid else self.info.tokens_per_image
            return visual_work(1, self.stages, (0,) * len(self.stages), self.info.depth) * self.kept_per_image(n) / n
        return visual_work(n0, self.stages, self.visual_after(n0, self.plan(n0)), self.info.depth)

    def _make_plan(self, n0: int) -> tuple[tuple[int, ...], tuple[str, ...]]:
        floor, notes = self.floor(n0), []
        if self.fraction is None:  # a schedule in the method's own terms
            fr = list(self.budget.value)
            if len(fr) != len(self.stages):
                raise ValueError(f"{self.label}: the keep schedule {self.budget!r} has {len(fr)} stages but the "
                                 f"method prunes at {len(self.stages)} layers {list(self.stages)}")
        else:  # the knob whose planned work is closest to keep
            keep = self.fraction

            def work(knob: float) -> float:
                kept = staged_counts(n0, self.stage_fractions(knob), floor)
                return visual_work(n0, self.stages, self.visual_after(n0, kept), self.info.depth)

            lo, hi = self.knob_range
            least = work(lo)
            if keep < 0.95 * least:
                raise ValueError(f"{self.label}: keep={keep} is below the least visual-token work it can keep "
                                 f"({least:.3f}: {self.least_reason()}); accepted: keep in [{least:.3f}, 1]")
            if keep < least:
                notes.append(f"{self.label}: keep={keep} is a little below the least visual-token work it can keep; "
                             f"it keeps {least:.3f}")
            fr = self.stage_fractions(closest_plan(work, keep, lo, hi)[0])
        counts = staged_counts(n0, fr, floor)
        notes += [f"{self.label}: stage {s} (layer {self.stages[s]}) keeps {c} of {n0} visual tokens, never fewer "
                  f"than one per image (the schedule's fraction {f:.3g} would keep {round(n0 * f)})"
                  for s, (f, c) in enumerate(zip(fr, counts)) if round(n0 * f) < c]
        return counts, tuple(notes)

    def stage_counts(self, view: StageView) -> Tensor:
        """(B,) visual tokens stage ``view.stage`` keeps per sample (its plan; 0 for samples without any)."""
        rows = [self.plan(n0)[view.stage] if n0 > 0 else 0 for n0 in view.n_visual0.tolist()]
        return torch.minimum(torch.tensor(rows, device=view.visual.device), view.visual.sum(1))

    def score_layer(self, stage: int) -> int:
        """LLM layer whose attention scores stage ``stage``."""
        return self.stages[stage] - 1

    def reduce_stage(self, view: StageView) -> StageDecision:
        raise NotImplementedError


# ---------------------------------------------------------------------------- budgets and layers
def image_count(keep: float, n: int) -> int:
    """round(keep * n) for a ratio, ``keep`` for a count; a clear error when that leaves no token or asks
    for more than there are (nothing is silently clipped)."""
    if isinstance(keep, int):
        if keep > n:
            raise ValueError(f"Keep(count={keep}) visual tokens per image is more than the {n} an image has "
                             f"(accepted: 1..{n})")
        return keep
    k = round(keep * n)
    if k < 1:
        raise ValueError(f"keep={keep} leaves zero of an image's {n} visual tokens; accepted: keep >= "
                         f"{0.5 / n:.3g}, or tr.Keep(count=n) with n in 1..{n}")
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
