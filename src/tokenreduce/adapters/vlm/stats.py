"""What ``Handle.stats`` reports for a VLM prefill (:class:`VlmStats`) and the functions that fill it: at the
LLM input, per decoder layer, per inside-LLM stage, and from the cache and FLOPs at the end."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ...accounting.flops import vlm_prefill_flops
from ..base import Stats

__all__ = ["VlmStats", "finish_stats", "kept_patches", "record_cache", "record_flops", "record_layer", "record_stage",
           "start_stats"]


@dataclass
class VlmStats(Stats):
    """:class:`Stats` of the last prefill plus VLM bookkeeping: per LLM layer the mean real tokens
    (``tokens_attn``), visual tokens (``visual_tokens``) and KV-cache entries (``kv_tokens``, padded per
    sample) and bytes (``kv_bytes``); ``kept_patches[b]`` = the patch indices of sample b's visual tokens
    at the LLM input (list per image) and ``stage_patches[s][b]`` those left after inside stage s (as
    ordinals of the LLM-input visual tokens; -1 = recycled/merged). ``visual_unreduced``: mean visual tokens
    of the unreduced prompt, so ``keep_achieved`` = mean(``visual_tokens``) / ``visual_unreduced`` (the
    fraction of the visual-token work kept, integration point ``vlm-visual``). ``stage_index[s][b]`` /
    ``stage_positions[s][b]``: LLM-input index (-1 = inserted) and position id of every token that enters
    layer ``stage_layers[s]`` (the exact token map, e.g. to rebuild the computation by masking)."""

    visual_tokens: list[float] = field(default_factory=list)
    visual_input: float = 0.0
    visual_unreduced: float = 0.0
    kv_tokens: list[int] = field(default_factory=list)
    kv_bytes: int = 0
    llm_input_tokens: float = 0.0
    kept_patches: list[list[list[int]]] = field(default_factory=list)
    stage_patches: list[list[list[int]]] = field(default_factory=list)
    stage_layers: list[int] = field(default_factory=list)
    stage_index: list[list[list[int]]] = field(default_factory=list)
    stage_positions: list[list[list[int]]] = field(default_factory=list)


def kept_patches(sources: Tensor | None, visual: Tensor, per_image: int) -> list[list[list[int]]]:
    """Per sample, per image: patch indices of the visual tokens at the LLM input (one list per sample
    when images have no fixed token count, e.g. anyres). ``sources`` (n_img, K): each image's kept patches
    after a before-the-LLM reduction (None: every patch, ``per_image`` of them)."""
    per = int(sources.shape[1]) if sources is not None else per_image
    out: list[list[list[int]]] = []
    i = 0
    for c in visual.sum(1).tolist():
        if per <= 0:
            out.append([list(range(c))])
            continue
        imgs: list[list[int]] = []
        for _ in range(c // per):
            imgs.append(sources[i].tolist() if sources is not None else list(range(per)))
            i += 1
        out.append(imgs)
    return out


def start_stats(name: str, input_tokens: int, real: Tensor, visual: Tensor, visual0: Tensor, reduce_seconds: float,
                sources: Tensor | None, per_image: int, keep: float | None) -> VlmStats:
    """The stats of a prefill at the LLM input: ``real`` / ``visual`` (B, L) its tokens, ``visual0`` (B,) the
    visual tokens of the unreduced prompt, ``keep`` the requested fraction (None for counts and schedules)."""
    st = VlmStats(method=name, input_tokens=int(input_tokens), keep=keep)
    st.llm_input_tokens = float(real.sum(1).float().mean())
    st.visual_input = float(visual.sum(1).float().mean())
    st.visual_unreduced = float(visual0.float().mean())
    st.reduce_seconds = reduce_seconds
    st.kept_patches = kept_patches(sources, visual, per_image)
    return st


def record_layer(st: VlmStats, real: Tensor, visual: Tensor) -> None:
    """Mean real and visual tokens that enter a decoder layer."""
    st.tokens_attn.append(float(real.sum(1).float().mean()))
    st.tokens_mlp.append(st.tokens_attn[-1])
    st.visual_tokens.append(float(visual.sum(1).float().mean()))


def finish_stats(st: VlmStats, notes: list[str]) -> None:
    """``keep_achieved`` from the per-layer visual tokens, and the method's ``notes`` of this prefill."""
    if st.visual_tokens and st.visual_unreduced > 0:
        st.keep_achieved = sum(st.visual_tokens) / (len(st.visual_tokens) * st.visual_unreduced)
    st.notes.extend(n for n in notes if n not in st.notes)


def record_stage(st: VlmStats, layer: int, index: Tensor, real: Tensor, visual: Tensor, pos: Tensor,
                 lm_visual: Tensor) -> None:
    """The tokens that enter stage layer ``layer``: LLM-input ``index`` (-1: inserted), ``real``, ``visual``
    and position ids ``pos`` (B, L); ``lm_visual`` (B, L0) the visual tokens at the LLM input."""
    ordinal = lm_visual.long().cumsum(1) - 1
    ords = torch.where(index >= 0, ordinal.gather(1, index.clamp(min=0)), -1)
    B = index.shape[0]
    st.stage_patches.append([ords[b][visual[b]].tolist() for b in range(B)])
    st.stage_layers.append(layer)
    st.stage_index.append([index[b][real[b]].tolist() for b in range(B)])
    st.stage_positions.append([pos[b][real[b]].tolist() for b in range(B)])


def record_cache(st: VlmStats, cache: Any) -> None:
    """KV-cache entries per layer and bytes of a DynamicCache after the prefill."""
    st.kv_tokens = [int(l.keys.shape[-2]) if getattr(l, "keys", None) is not None else 0 for l in cache.layers]
    st.kv_bytes = int(sum(l.keys.numel() * l.keys.element_size() + l.values.numel() * l.values.element_size()
                          for l in cache.layers if getattr(l, "keys", None) is not None))


def record_flops(st: VlmStats, config: Any, images_per_sample: float, unreduced_tokens: float) -> None:
    """Prefill GFLOPs of this run (from the per-layer tokens) and of the unreduced prompt."""
    f = vlm_prefill_flops(config, st, st.llm_input_tokens, images_per_sample)
    f0 = vlm_prefill_flops(config, None, unreduced_tokens, images_per_sample)
    st.flops = {"gflops": f["gflops"], "gflops_unreduced": f0["gflops"]}
