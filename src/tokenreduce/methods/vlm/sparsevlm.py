"""SparseVLM inside the LLM: text raters score the visual tokens, deleted ones are recycled (see :class:`SparseVLM`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ...core import ops
from ...core import strategies as S
from ...core import visual as V
from ...core.budget import Keep
from ...core.state import TokenState, batched_index_select
from ...registry import register
from .base import VLM, ModelInfo, StageDecision, StageView, VlmMethod, increasing_layers, scaled_layers

__all__ = ["SparseVLM"]


@register("sparsevlm", modality="multimodal", integration=VLM,
          paper="Zhang et al., SparseVLM: Visual Token Sparsification for Efficient VLM Inference, ICML 2025",
          equation="s_i=mean_{j in raters} mean_h A_h[j,i]; recycle top 30% deleted via DPC-KNN merge",
          presets={"paper": {"keep": Keep(tuple(v / 576 for v in V.SPARSEVLM_LISTS[64]))}})
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
    tokens. Positions are re-indexed contiguously (official code).

    ``keep`` (the fraction of the visual-token work, over all layers: those before the first pruning count
    in full, the merged recycled tokens count as visual tokens): the stages keep c x (66, 30, 17)/576 of the
    image tokens (the official 64-token list's shape, capped at 1), c solved so that the work is closest to
    keep; no stage leaves fewer than one selected visual token per image. ``tr.Keep([f1, f2, f3])`` gives
    each stage's selected fraction; preset ``"paper"``: the official 64-token list, (66, 30, 17)/576."""

    layers: Sequence[int] | None = None
    recycle: float = 0.3
    raters_from: str = "after_image"
    positions: ClassVar[str] = "compact"
    label: ClassVar[str] = "sparsevlm"
    takes_count: ClassVar[bool] = False
    own_terms: ClassVar[str] = "Keep([...]): the fraction of the image tokens each stage selects"
    least_hint: ClassVar[str] = ", plus the merged recycled tokens; earlier layers= reach less"

    def setup(self, info: ModelInfo) -> None:
        super().setup(info)
        locs = tuple(self.layers) if self.layers is not None else scaled_layers((2, 6, 15), 32, info.depth, low=0)
        locs = tuple(l for l in locs if l < info.depth - 1) or (0,)
        locs = increasing_layers(locs, info.depth - 1, low=0)
        self._locs = locs
        self.stages = tuple(l + 1 for l in locs)

    def _shape(self) -> list[float]:
        """The official 64-token list's per-stage fractions (halved for stages beyond its three)."""
        base = [v / 576 for v in V.SPARSEVLM_LISTS[64]][: len(self.stages)]
        while len(base) < len(self.stages):
            base.append(base[-1] * 0.5)
        return base

    @property
    def knob_range(self) -> tuple[float, float]:  # type: ignore[override]
        return 0.0, 1.0 / min(self._shape())

    def stage_fractions(self, knob: float) -> list[float]:
        return [min(1.0, knob * b) for b in self._shape()]

    def visual_after(self, n0: int, kept: tuple[int, ...]) -> tuple[int, ...]:
        return V.sparsevlm_after(n0, kept, self.recycle)

    def score_layer(self, stage: int) -> int:
        return self._locs[stage]

    def _rater_mask(self, view: StageView) -> Tensor:
        """(B, L0) the LLM-input text tokens that rate the visual tokens (computed at the first stage)."""
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
        return self._raters

    def reduce_stage(self, view: StageView) -> StageDecision:
        raters = torch.zeros_like(view.real)
        ok = view.index >= 0
        raters[ok] = self._rater_mask(view).gather(1, view.index.clamp(min=0))[ok]
        raters &= view.real & ~view.visual
        q_idx, q_ok = ops.compact(raters)
        p = view.attn(view.layer - 1, q_idx).mean(1)  # (B, Q, L)
        s = (p * q_ok[..., None]).sum(1) / q_ok.sum(1, keepdim=True).clamp(min=1)
        keep = ops.masked_topk(s, view.visual, self.stage_counts(view))
        deleted = view.visual & ~keep
        extra = extra_valid = None
        if self.recycle > 0 and deleted.any():
            n_rec, n_clu = V.sparsevlm_recycled(deleted.sum(1), self.recycle)
            r_idx, r_ok = ops.compact(ops.masked_topk(s, deleted, n_rec))
            xr = batched_index_select(view.hidden, r_idx)
            st = TokenState.from_tensor(xr, mask=r_ok, check=False)
            merged = S.cluster_merge(st, xr, n_clu, algo="dpc-knn", k=max(1, int(n_clu.max())))
            extra, extra_valid = merged.x, merged.mask
        return StageDecision(keep, extra, extra_valid)
