"""Visual token reduction for LLaVA-style VLMs (integration point ``vlm-visual``).

Two places, as in the papers:

* **before the LLM** (``visionzip``, ``divprune``, ``hiprune``, ``pool``, ``random``; stage 1 of ``todre``):
  each image's visual tokens are reduced once, on the vision features before LLaVA's projector
  (``where = "pre"``) or on the projected features (``"post"``); the prompt then carries fewer image
  placeholders, so the LLM sees a shorter sequence. ``positions="compact"`` (default): contiguous position
  ids, as LLaVA builds its input sequence from the reduced features (the papers' code); ``"keep"``: every
  surviving token keeps the id it has in the unreduced prompt (its patch's slot; the text after the image
  keeps its ids too), so the LLM sees the image at the positions it was trained with.
* **inside the LLM** (``fastv``, ``sparsevlm``, ``pdrop``; stage 2 of ``todre``): at chosen decoder layers
  the visual tokens' hidden states are pruned during prefill, so later layers compute and cache only the
  survivors (their KV cache is really smaller); text tokens are never removed. Scores use the attention
  the last (or rater) text tokens pay, computed from a layer's own q/k for those few query rows.

``keep``, per method (a float fraction in (0, 1] or an int count of visual tokens per image):

=========== ======================================================================== =====================
method      keep means                                                               paper default
=========== ======================================================================== =====================
visionzip   tokens per image (dominant + contextual, 54:10 as LLaVA's 64-token cfg)  64/576
divprune    tokens per image                                                         0.098 (~56/576)
hiprune     tokens per image (anchors + buffers + registers)                         192/576
pool        tokens per image (average pooling of the patch grid)                     --
random      tokens per image (seeded)                                                --
fastv       visual tokens kept from ``layer`` on (FastV's 1 - R)                     K=2, R=50% -> 0.5
sparsevlm   visual fraction averaged over the layers from the 1st pruned one on,        64/576
            split over stages in the official 64-token list's shape (66 : 30 : 17)
pdrop       PyramidDrop's lambda: fraction kept at each stage (lambda, lambda^2, ...)  0.5
todre       tokens per image after stage 1 (diversity); all visual tokens dropped    0.1
            from ``layer`` on (information migration); keep=1: identity
=========== ======================================================================== =====================

The layer-averaged visual-token fraction each run really had is in ``Handle.stats`` (``visual_tokens``
per layer) and in the benchmark's FLOPs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..core import criteria as C
from ..core import ops
from ..core import strategies as S
from ..core import visual as V
from ..core.budget import Keep, KeepLike, validate_keep_value
from ..core.state import TokenState
from ..registry import register

__all__ = [
    "VLM",
    "DivPrune",
    "FastV",
    "HiPrune",
    "ModelInfo",
    "PDrop",
    "PoolVLM",
    "RandomVLM",
    "SparseVLM",
    "StageDecision",
    "StageView",
    "ToDRE",
    "VisionZip",
    "VlmMethod",
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
    LLM ``layer`` (computed from that layer's own q/k projections for the Q query rows only).
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


def _layer_ok(layer: int, depth: int, name: str, low: int = 1) -> int:
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"{name} must be an int layer index, got {layer!r}")
    if not low <= layer < depth:
        raise ValueError(f"{name}={layer} is out of range: this LLM has {depth} decoder layers, accepted {low}..{depth - 1}")
    return layer


def _scaled(layers: Sequence[int], of: int, depth: int, low: int = 1) -> tuple[int, ...]:
    """Paper layer indices for a ``of``-layer LLM scaled to ``depth`` layers (distinct, in [low, depth-1])."""
    out = sorted({min(max(low, round(l * depth / of)), depth - 1) for l in layers})
    return tuple(out)


def _prune_by(x: Tensor, keep_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gather the kept tokens (same count per image) in order."""
    k = int(keep_mask.sum(1)[0])
    idx = torch.argsort((~keep_mask).to(torch.int8), dim=1, stable=True)[:, :k]
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1])), idx, torch.ones(idx.shape, device=x.device)


# ============================================================================ before the LLM
@dataclass
class VisionZip(VlmMethod):
    """VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in VLMs", CVPR 2025).

    On the vision layer that produces LLaVA's features: dominant tokens = top-k of the [CLS] attention
    a_i = sum_h A_h[cls, i] (Sec. 3.2, Eq. 1); contextual tokens: the rest are grouped by key similarity to
    uniformly spaced targets and merged, x_t' = x_t + mean_{i -> t} x_i (official code); then LLaVA's
    projector. ``contextual``: fraction of the budget that is contextual (10/64 in the paper's
    64-token setting). Towers without [CLS] use the mean attention received instead.
    """

    keep: KeepLike = 64 / 576
    contextual: float = 10 / 64
    positions: str = "compact"
    where: ClassVar[str | None] = "pre"

    def vision_layers(self) -> dict[int, frozenset[str]]:
        return {self.info.feature_layer: frozenset({"cls" if self.info.has_cls else "mean", "keys"})}

    def reduce_image(self, x: Tensor, ctx: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        if not 0.0 <= self.contextual < 1.0:
            raise ValueError(f"contextual={self.contextual} must be in [0, 1)")
        k = self.count(x.shape[1])
        n_ctx = min(round(k * self.contextual), k - 1) if k > 1 else 0
        lay = self.info.feature_layer
        score = ctx["cls"][lay] if self.info.has_cls else ctx["mean"][lay]
        return V.visionzip_merge(x, score, ctx["keys"][lay], k - n_ctx, n_ctx)


@dataclass
class DivPrune(VlmMethod):
    """DivPrune (Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal
    Models", CVPR 2025): keep the max-min diverse subset of the projected visual tokens,
    S* = argmax_{|S|=k} min_{i != j in S} (1 - cos(x_i, x_j)), solved greedily (Alg. 1; see
    :func:`tokenreduce.core.criteria.divprune_order`). Paper default: ~9.8% of the tokens."""

    keep: KeepLike = 0.098
    positions: str = "compact"
    where: ClassVar[str | None] = "post"

    def reduce_image(self, x: Tensor, ctx: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        k = self.count(x.shape[1])
        valid = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        keep = ops.masked_topk(C.divprune_order(x, valid), valid, torch.full((x.shape[0],), k))
        return _prune_by(x, keep)


@dataclass
class HiPrune(VlmMethod):
    """HiPrune (Liu et al., "HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in
    Vision Encoders", 2025): anchors = top attention in a middle "object" layer, buffers = their
    4-neighbours, registers = top attention in the output layer; attention = mean over heads and queries
    (the official "global attention"); buffers are true grid neighbours (the official flat index +-1 can
    wrap across rows); see :func:`tokenreduce.core.visual.hiprune_keep`.
    ``object_layer`` (1-based, default scaled from 9 of CLIP-L's 24 layers), ``alpha`` = 0.1."""

    keep: KeepLike = 192 / 576
    alpha: float = 0.1
    object_layer: int | None = None
    positions: str = "compact"
    where: ClassVar[str | None] = "pre"

    def setup(self, info: ModelInfo) -> None:
        super().setup(info)
        if info.grid is None:
            raise ValueError("hiprune needs a plain patch grid (LLaVA-1.5 style); this model's image tokens are not one grid")
        ol = self.object_layer if self.object_layer is not None else max(1, round(9 * info.vision_depth / 24))
        if not 1 <= ol <= info.vision_depth:
            raise ValueError(f"object_layer={ol} is out of range: the vision tower has {info.vision_depth} layers "
                             f"(accepted 1..{info.vision_depth}, 1-based)")
        self._object = ol - 1

    def vision_layers(self) -> dict[int, frozenset[str]]:
        out = {self.info.feature_layer: frozenset({"mean"})}
        out[self._object] = out.get(self._object, frozenset()) | {"mean"}
        return out

    def reduce_image(self, x: Tensor, ctx: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        keep = V.hiprune_keep(ctx["mean"][self._object], ctx["mean"][self.info.feature_layer], self.info.grid,
                              self.count(x.shape[1]), self.alpha)
        return _prune_by(x, keep)


@dataclass
class PoolVLM(VlmMethod):
    """Average-pooling baseline: the projected patch grid pooled to about ``keep`` of its cells (adaptive
    non-overlapping bins, :func:`tokenreduce.core.strategies.pool`); a pooled token's position (with
    ``positions="keep"``) is its bin's first patch."""

    positions: str = "compact"
    where: ClassVar[str | None] = "post"

    def setup(self, info: ModelInfo) -> None:
        super().setup(info)
        if info.grid is None:
            raise ValueError("pool needs a plain patch grid (LLaVA-1.5 style); this model's image tokens are not one grid")

    def reduce_image(self, x: Tensor, ctx: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        st = TokenState.from_tensor(x, grid=self.info.grid, check=False)
        out = S.pool(st, torch.full((x.shape[0],), self.count(x.shape[1])))
        return out.x, out.source, out.size


@dataclass
class RandomVLM(VlmMethod):
    """Random baseline: a seeded random ``keep`` subset of each image's patches (same draw for every
    image, so a sample keeps the same tokens alone or in a batch)."""

    seed: int = 0
    positions: str = "compact"
    where: ClassVar[str | None] = "pre"

    def reduce_image(self, x: Tensor, ctx: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        st = TokenState.from_tensor(x, check=False)
        scores = C.Random(seed=self.seed)(st)
        keep = ops.masked_topk(scores, st.mask, torch.full((x.shape[0],), self.count(x.shape[1])))
        return _prune_by(x, keep)


# ============================================================================ inside the LLM
def _stage_counts(view: StageView, frac: float, first: bool = True) -> Tensor:
    """Visual tokens kept per sample at this stage: ``frac`` of the LLM-input visual tokens (or a count).
    The first reduction of a sample that has visual tokens may not leave zero (a clear error); later
    pyramid stages may."""
    n_now = view.visual.sum(1)
    if isinstance(frac, int):
        if (n_now < frac).any():
            raise ValueError(f"keep={frac} visual tokens is more than a sample has ({int(n_now.min())})")
        return torch.full_like(n_now, frac)
    k = torch.minimum(torch.round(view.n_visual0.double() * frac).long(), n_now)
    if first and ((k < 1) & (n_now > 0)).any():
        n = int(view.n_visual0[(k < 1) & (n_now > 0)].min())
        raise ValueError(f"keep={frac:.4g} leaves zero of {n} visual tokens; accepted: a ratio >= {0.5 / n:.3g}")
    return k


def _last_query_scores(view: StageView, layer: int) -> Tensor:
    """Attention the last real token pays to each current token at ``layer``, mean over heads: (B, L)."""
    p = view.attn(layer, view.last[:, None])  # (B, H, 1, L)
    return p.mean(1)[:, 0]


@dataclass
class FastV(VlmMethod):
    """FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024).

    At layer K, visual token i is scored by the attention the last token pays it in layer K-1, averaged
    over heads, s_i = mean_h A^{(K-1)}_h[last, i]; the top (1-R) of the visual tokens are kept from layer K
    on with their original position ids (the official code's ``position_ids = keep_indexs``).
    ``layer`` = K (paper: 2), ``keep`` = 1 - R (paper: R = 50%)."""

    keep: KeepLike = 0.5
    layer: int = 2

    def setup(self, info: ModelInfo) -> None:
        super().setup(info)
        self.stages = (_layer_ok(self.layer, info.depth, "layer"),)

    def reduce_stage(self, view: StageView) -> StageDecision:
        s = _last_query_scores(view, view.layer - 1)
        return StageDecision(ops.masked_topk(s, view.visual, _stage_counts(view, self.keep)))


@dataclass
class SparseVLM(VlmMethod):
    """SparseVLM (Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language
    Model Inference", ICML 2025).

    Raters: the text tokens after the image (``raters_from="after_image"``, LLaVA's question; "all_text" for
    prompts that put the question first) whose relevance R_j = mean_i softmax_j(v_i . t_j) (visual x text
    input embeddings) exceeds the mean (:func:`~tokenreduce.core.visual.sparsevlm_raters`). At each pruning layer
    l (paper: 2, 6, 15 of 32, scaled to the model) visual token i is scored by the raters' attention in
    layer l, s_i = mean_{j in R} mean_h A^{(l)}_h[j, i]; the top tokens are kept from layer l+1 on.
    Recycling: of the deleted tokens, the top ``recycle`` (30%) by score are clustered with DPC-KNN into
    ceil(n/10) groups and each group is merged into one token (mean), inserted after the kept visual
    tokens. Positions are re-indexed contiguously (official code). ``keep``: visual-token fraction averaged
    over the layers from the first pruned one on, split over the stages in the shape of the official
    64-token list (66 : 30 : 17 of 576); default 64/576."""

    keep: KeepLike = 64 / 576
    layers: Sequence[int] | None = None
    recycle: float = 0.3
    raters_from: str = "after_image"
    positions: ClassVar[str] = "compact"

    def setup(self, info: ModelInfo) -> None:
        super().setup(info)
        locs = tuple(self.layers) if self.layers is not None else _scaled((2, 6, 15), 32, info.depth, low=0)
        locs = tuple(l for l in locs if l < info.depth - 1) or (0,)
        for l in locs:
            _layer_ok(l, info.depth - 1, "layers[i]", low=0)
        if list(locs) != sorted(set(locs)):
            raise ValueError(f"layers must be distinct and increasing, got {list(locs)}")
        if isinstance(self.keep, int):
            raise TypeError("sparsevlm's keep is a layer-averaged fraction: give a float in (0, 1]")
        self._locs = locs
        self.stages = tuple(l + 1 for l in locs)
        self._fracs = V.sparsevlm_schedule(float(self.keep), self.stages, info.depth)

    def score_layer(self, stage: int) -> int:
        return self._locs[stage]

    def reduce_stage(self, view: StageView) -> StageDecision:
        if view.stage == 0 or getattr(self, "_raters", None) is None or self._raters.shape != view.lm_real.shape:
            # raters come from the text after the image (LLaVA's question), as in the official code, or from
            # all prompt text (prompts that put the question before the image)
            if self.raters_from not in ("after_image", "all_text"):
                raise ValueError(f"raters_from={self.raters_from!r}: accepted 'after_image', 'all_text'")
            ar = torch.arange(view.lm_real.shape[1], device=view.lm_real.device)[None]
            after = ar > torch.where(view.lm_visual, ar, -1).amax(1, keepdim=True)
            text0 = view.lm_real & ~view.lm_visual & (after | (self.raters_from == "all_text"))
            text0 = torch.where(text0.any(1, keepdim=True), text0, view.lm_real & ~view.lm_visual)
            self._raters = V.sparsevlm_raters(view.lm_input, view.lm_input, view.lm_visual, text0)
        raters = torch.zeros_like(view.real)
        ok = view.index >= 0
        raters[ok] = self._raters.gather(1, view.index.clamp(min=0))[ok]
        raters &= view.real & ~view.visual
        Q = int(raters.sum(1).max())
        q_idx = torch.argsort((~raters).to(torch.int8), dim=1, stable=True)[:, :Q]
        q_ok = torch.arange(Q, device=q_idx.device)[None] < raters.sum(1, keepdim=True)
        p = view.attn(view.layer - 1, q_idx).mean(1)  # (B, Q, L)
        s = (p * q_ok[..., None]).sum(1) / q_ok.sum(1, keepdim=True).clamp(min=1)
        keep = ops.masked_topk(s, view.visual, _stage_counts(view, self._fracs[view.stage], view.stage == 0))
        deleted = view.visual & ~keep
        extra = extra_valid = None
        if self.recycle > 0 and deleted.any():
            n_del = deleted.sum(1)
            n_rec = torch.where(n_del > 0, (n_del.float() * self.recycle).long() + 1, 0).clamp(max=n_del)
            rec = ops.masked_topk(s, deleted, n_rec)
            Rm = int(rec.sum(1).max())
            r_idx = torch.argsort((~rec).to(torch.int8), dim=1, stable=True)[:, :Rm]
            r_ok = torch.arange(Rm, device=r_idx.device)[None] < rec.sum(1, keepdim=True)
            xr = view.hidden.gather(1, r_idx[..., None].expand(-1, -1, view.hidden.shape[-1]))
            st = TokenState.from_tensor(xr, mask=r_ok, check=False)
            n_clu = torch.where(r_ok.sum(1) > 0, r_ok.sum(1) // 10 + 1, 0).clamp(max=r_ok.sum(1))
            merged = S.cluster_merge(st, xr, n_clu, algo="dpc-knn", k=max(1, int(n_clu.max())))
            extra, extra_valid = merged.x, merged.mask
        return StageDecision(keep, extra, extra_valid)


@dataclass
class PDrop(VlmMethod):
    """PyramidDrop (Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid
    Visual Redundancy Reduction", CVPR 2025).

    The LLM is split into stages at layers (8, 16, 24) of 32 (scaled to the model); at the start of stage s
    the visual tokens are ranked by the attention the last instruction token pays them, computed with that
    layer's own q/k on its input, s_i = mean_h softmax(q_last k^T / sqrt(d))_i, and lambda of them survive,
    so stage s keeps lambda^s of the image tokens (paper: lambda = 0.5). Positions are re-indexed
    contiguously (official code). ``keep`` = lambda."""

    keep: KeepLike = 0.5
    layers: Sequence[int] | None = None
    positions: ClassVar[str] = "compact"

    def setup(self, info: ModelInfo) -> None:
        super().setup(info)
        layers = tuple(self.layers) if self.layers is not None else _scaled((8, 16, 24), 32, info.depth)
        for l in layers:
            _layer_ok(l, info.depth, "layers[i]")
        if list(layers) != sorted(set(layers)):
            raise ValueError(f"layers must be distinct and increasing, got {list(layers)}")
        if isinstance(self.keep, int):
            raise TypeError("pdrop's keep is the per-stage ratio lambda: give a float in (0, 1]")
        self.stages = layers

    def score_layer(self, stage: int) -> int:
        return self.stages[stage]

    def reduce_stage(self, view: StageView) -> StageDecision:
        s = _last_query_scores(view, view.layer)
        frac = float(self.keep) ** (view.stage + 1)
        return StageDecision(ops.masked_topk(s, view.visual, _stage_counts(view, frac, view.stage == 0)))


@dataclass
class ToDRE(VlmMethod):
    """ToDRE (Li, Yang, Lu, "Visual Token Pruning via Diversity and Task Awareness for Efficient Large
    Vision-Language Models", arXiv:2505.18757, 2025), two stages:

    1. diversity, after the vision encoder: greedy k-center (max-min) selection of ``keep`` of each image's
       projected tokens, S_{t+1} = S_t + argmax_i min_{j in S_t} d(x_i, x_j) (cosine distance), started at
       the patch [CLS] attends most (the most isolated token if the tower has no [CLS]) -- the start token
       is this implementation's choice;
    2. task relevance ("information migration"), inside the LLM: from ``layer`` on (default: the middle
       layer) the visual tokens are dropped. With ``relevance`` = tau > 0 the drop is adaptive: only samples
       whose last token pays the visual tokens less than tau of its attention at layer-1 drop them.

    ``keep=1`` is the identity (both stages off, DESIGN.md invariant 1): stage 2 has no budget of its own,
    so it acts only together with a stage-1 reduction (``keep < 1``).
    """

    keep: KeepLike = 0.1
    layer: int | None = None
    relevance: float = 0.0
    positions: str = "compact"
    where: ClassVar[str | None] = "post"

    def setup(self, info: ModelInfo) -> None:
        super().setup(info)
        lay = self.layer if self.layer is not None else max(1, info.depth // 2)
        _layer_ok(lay, info.depth, "layer")
        self.stages = () if self.is_identity else (lay,)  # keep=1: no stage 2 either (identity)

    def vision_layers(self) -> dict[int, frozenset[str]]:
        return {self.info.feature_layer: frozenset({"cls"})} if self.info.has_cls else {}

    def reduce_image(self, x: Tensor, ctx: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        B, N, _ = x.shape
        k = self.count(N)
        valid = torch.ones(B, N, dtype=torch.bool, device=x.device)
        if self.info.has_cls:
            first = ctx["cls"][self.info.feature_layer].argmax(1)
            m = torch.nn.functional.normalize(x.float(), dim=-1)
            dist = 1.0 - m @ m.transpose(1, 2)
            scores = torch.full((B, N), float("-inf"), device=x.device)
            mind = torch.full((B, N), float("inf"), device=x.device)
            picked = torch.zeros(B, N, dtype=torch.bool, device=x.device)
            cur, ar = first, torch.arange(B, device=x.device)
            for t in range(k):
                scores[ar, cur] = float(N - t)
                picked[ar, cur] = True
                mind = torch.minimum(mind, dist[ar, cur])
                cur = mind.masked_fill(picked, float("-inf")).argmax(1)
        else:
            scores = C.divprune_order(x, valid)
        return _prune_by(x, ops.masked_topk(scores, valid, torch.full((B,), k)))

    def reduce_stage(self, view: StageView) -> StageDecision:
        drop = torch.ones(view.real.shape[0], dtype=torch.bool, device=view.real.device)
        if self.relevance > 0:
            p = _last_query_scores(view, view.layer - 1)
            drop = (p * view.visual).sum(1) < self.relevance
        return StageDecision(view.visual & ~drop[:, None])


# --------# ---------------------------------------------------------------------------- registration
def _reg(name: str, cls: type, paper: str, equation: str) -> None:
    register(name, modality="multimodal", integration=VLM, paper=paper, equation=equation)(cls)


_reg("visionzip", VisionZip, "Yang et al., VisionZip: Longer is Better but Not Necessary in VLMs, CVPR 2025",
     "dominant=topk sum_h A[cls,i]; contextual x_t'=x_t+mean_{i->t} x_i (key similarity)")
_reg("divprune", DivPrune, "Alvar et al., DivPrune: Diversity-based Visual Token Pruning for LMMs, CVPR 2025",
     "S=argmax_{|S|=k} min_{i!=j in S} 1-cos(x_i,x_j) (greedy max-min)")
_reg("hiprune", HiPrune, "Liu et al., HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention, 2025",
     "anchors=topk A_mid; buffers=4-neighbours; registers=topk A_out")
_reg("pool", PoolVLM, "average-pooling baseline (visual tokens)", "adaptive avg-pool of the projected patch grid")
_reg("random", RandomVLM, "random visual-token baseline", "keep a seeded random subset per image")
_reg("fastv", FastV, "Chen et al., An Image is Worth 1/2 Tokens After Layer 2 (FastV), ECCV 2024",
     "s_i=mean_h A^{K-1}_h[last,i]; keep top (1-R) visual tokens from layer K")
_reg("sparsevlm", SparseVLM, "Zhang et al., SparseVLM: Visual Token Sparsification for Efficient VLM Inference, ICML 2025",
     "s_i=mean_{j in raters} mean_h A_h[j,i]; recycle top 30% deleted via DPC-KNN merge")
_reg("pdrop", PDrop, "Xing et al., PyramidDrop: Pyramid Visual Redundancy Reduction, CVPR 2025",
     "stage s keeps lambda^s visual tokens ranked by softmax(q_last k^T/sqrt d)")
_reg("todre", ToDRE, "Li et al., ToDRE: Visual Token Pruning via Diversity and Task Awareness, arXiv 2505.18757",
     "greedy k-center diversity before the LLM; drop visual tokens at layer L (information migration)")
