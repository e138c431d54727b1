"""VLM adapter: visual token reduction in transformers' LLaVA family (integration point ``vlm-visual``).

Supported: ``LlavaForConditionalGeneration`` / ``LlavaModel`` (LLaVA-1.5 style: one patch grid per image),
and for the inside-the-LLM methods also ``LlavaNext*`` / ``LlavaOnevision*`` (same placeholder -> LLM code
path; their anyres image tokens are not one grid, so before-the-LLM methods refuse them). The language
model must be a RoPE decoder with ``layers``/``rotary_emb`` (Llama, Mistral, Qwen2, ...), attention
``sdpa`` or ``eager``, and the cache a ``DynamicCache`` (generate's default).

How, with hooks and instance attributes only (``Handle.remove()`` restores the model exactly):

* **before the LLM** — the projector's ``forward`` is wrapped: the method reduces each image's vision
  features (``where="pre"``) or projected features (``"post"``); the vision attention it needs ([CLS] row,
  mean attention, keys) is computed from forward hooks on the q/k projections of the few encoder layers
  it names. A projector that adds a per-patch position embedding (``takes_source_patches = True``, the
  small VLM's :class:`~tokenreduce.models.small_vlm.GridPositionProjector`) gets each kept token's source
  patch (``source_patches``) after a ``"pre"`` reduction. A forward pre-hook on ``LlavaModel`` then drops
  the surplus ``<image>`` placeholders from ``input_ids`` (so HF's placeholder-count check holds) and
  re-pads ragged rows; positions are re-indexed (``positions="compact"``) or each kept token keeps its
  patch slot's id (``"keep"``).
* **inside the LLM** — forward pre-hooks on the decoder layers: at a stage layer the method scores the
  visual tokens (attention rows of the last/rater text tokens computed from that layer's own q/k, for those
  rows only), the hidden states are gathered, and that layer and all later ones get their own 4D mask
  and rotary embeddings for the shorter sequence; their KV cache holds only the survivors.
* **decoding** — generate keeps a 2D mask and position ids for the *original* prompt. The pre-hooks
  translate them per layer group: the prompt part of the mask is replaced by the group's kept-token mask,
  positions shifted by the tokens removed before them (when the method re-indexes positions).
"""

from __future__ import annotations

import sys
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..core.ops import attention_probs
from ..methods.vlm import ModelInfo, StageDecision, StageView, VlmMethod
from .base import Handle, Patcher, Stats, register_adapter

__all__ = ["LLAVA_CLASSES", "VlmAdapter", "VlmStats"]

LLAVA_CLASSES = ("LlavaForConditionalGeneration", "LlavaModel", "LlavaNextForConditionalGeneration",
                 "LlavaNextModel", "LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel")
_GRID_CLASSES = ("LlavaForConditionalGeneration", "LlavaModel")


@dataclass
class VlmStats(Stats):
    """:class:`Stats` of the last prefill plus VLM bookkeeping: per LLM layer the mean real tokens
    (``tokens_attn``), visual tokens (``visual_tokens``) and KV-cache entries (``kv_tokens``, padded per
    sample) and bytes (``kv_bytes``); ``kept_patches[b]`` = the patch indices of sample b's visual tokens
    at the LLM input (list per image) and ``stage_patches[s][b]`` those left after inside stage s (as
    ordinals of the LLM-input visual tokens; -1 = recycled/merged). ``stage_index[s][b]`` /
    ``stage_positions[s][b]``: LLM-input index (-1 = inserted) and position id of every token that enters
    layer ``stage_layers[s]`` (the exact token map, e.g. to rebuild the computation by masking)."""

    visual_tokens: list[float] = field(default_factory=list)
    visual_input: float = 0.0
    kv_tokens: list[int] = field(default_factory=list)
    kv_bytes: int = 0
    llm_input_tokens: float = 0.0
    kept_patches: list[list[list[int]]] = field(default_factory=list)
    stage_patches: list[list[list[int]]] = field(default_factory=list)
    stage_layers: list[int] = field(default_factory=list)
    stage_index: list[list[list[int]]] = field(default_factory=list)
    stage_positions: list[list[list[int]]] = field(default_factory=list)


@dataclass
class _Parts:
    llava: nn.Module  # LlavaModel
    lm: nn.Module  # the decoder (LlamaModel, Qwen2Model, ...)
    layers: list[nn.Module]
    vision_layers: list[nn.Module]
    projector: nn.Module
    config: Any


def _parts(model: nn.Module) -> _Parts:
    llava = model.model if type(model).__name__.endswith("ForConditionalGeneration") else model
    lm = llava.language_model
    if not hasattr(lm, "layers") or not hasattr(lm, "rotary_emb"):
        raise TypeError(f"{type(model).__name__}'s language model {type(lm).__name__} is not a RoPE decoder with "
                        f"`layers`/`rotary_emb` (Llama, Mistral, Qwen2 ...): unsupported")
    vt = llava.vision_tower
    enc = getattr(getattr(vt, "vision_model", vt), "encoder", None)
    vlayers = list(enc.layers) if enc is not None and hasattr(enc, "layers") else []
    return _Parts(llava, lm, list(lm.layers), vlayers, llava.multi_modal_projector, llava.config)


def _neg(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).min if dtype.is_floating_point else torch.finfo(torch.float32).min


def _mask4d(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, Q, K) bool -> additive (B, 1, Q, K) mask in ``dtype`` (works for eager and SDPA)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, _neg(dtype))[:, None]


def _causal_allowed(real: Tensor) -> Tensor:
    """(B, L) real-token mask -> (B, L, L) causal & padding mask in the current order."""
    L = real.shape[1]
    tri = torch.ones(L, L, dtype=torch.bool, device=real.device).tril()
    return tri[None] & real[:, None, :]


def _with_cls(src: Tensor) -> Tensor:
    """Source patches (B, K) of kept tokens with the CLS token's -1 (no patch) in front."""
    return torch.cat([torch.full_like(src[:, :1], -1), src], 1)


def _gather(x: Tensor, idx: Tensor) -> Tensor:
    """x (B, L, ...) gathered along dim 1 with idx (B, K)."""
    view = idx.reshape(*idx.shape, *([1] * (x.dim() - 2))).expand(*idx.shape, *x.shape[2:])
    return x.gather(1, view)


@dataclass
class _Stage:
    layer: int
    real: Tensor  # (B, L_s) kept-token mask (prompt part of this group's cache)
    shift: Tensor  # (B,) decode position shift for this group
    compact: bool


@dataclass
class _Plan:
    """What decoding needs from the last prefill."""

    cache: Any  # weakref to the cache object
    orig_len: int  # prompt length of the 2D mask generate keeps
    base_len: int  # prompt length of the LLM input (after before-the-LLM compaction)
    base_real: Tensor  # (B, base_len)
    base_shift: Tensor  # (B,) decode position shift (tokens removed before the LLM, 0 with positions="keep")
    base_removed: Tensor  # (B,) prompt tokens removed before the LLM
    stages: list[_Stage]
    compacted: bool = False


@dataclass
class _Cur:
    """Per-prefill state carried across decoder layers."""

    index: Tensor  # (B, L) position in the LLM input (-1: inserted)
    real: Tensor
    visual: Tensor
    pos: Tensor  # (B, L) position ids
    lm_input: Tensor
    lm_visual: Tensor
    lm_real: Tensor
    n_visual0: Tensor
    lm_last_pos: Tensor  # (B,) position id of the last real LLM-input token
    pad_left: bool
    mask4d: Tensor | None = None
    pe: tuple[Tensor, Tensor] | None = None
    changed: bool = False
    inputs: dict = field(default_factory=dict)  # layer -> (hidden, pe, real)


class _Run:
    def __init__(self, model: nn.Module, method: VlmMethod, name: str, parts: _Parts, info: ModelInfo) -> None:
        self.model, self.method, self.name, self.p, self.info = model, method, name, parts, info
        self.image_token = int(parts.config.image_token_id)
        self.attn_impl = parts.lm.config._attn_implementation
        self.plan: _Plan | None = None
        self.cur: _Cur | None = None
        self.phase = "off"
        self.vision_qk: dict[int, dict[str, Tensor]] = {}
        self.image_sources: Tensor | None = None  # (n_img, K) patch index of each image token after reduction
        self._stats = VlmStats(method=name)
        self._cur_stats = VlmStats(method=name)
        self.stage_of_layer: dict[int, int] = {}
        self.first_stage = min(method.stages) if method.stages else len(parts.layers)
        score_layers = {method.score_layer(s) for s in range(len(method.stages))}
        self.capture_layers = {l for l in score_layers if l not in method.stages}
        self.dec_cache: dict[int, tuple[Tensor | None, tuple[Tensor, Tensor] | None]] = {}

    def stats(self) -> VlmStats:
        return self._stats

    # ------------------------------------------------------------------ vision side
    def vision_hook(self, layer: int, kind: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: Tensor) -> None:
            self.vision_qk.setdefault(layer, {})[kind] = out
        return hook

    def vision_context(self) -> dict[str, dict[int, Tensor]]:
        """[CLS] attention row, mean attention received and mean keys of the requested vision layers,
        restricted to the patches LLaVA feeds the projector."""
        ctx: dict[str, dict[int, Tensor]] = {"cls": {}, "mean": {}, "keys": {}}
        drop = 1 if self.info.has_cls else 0  # the projector input's [CLS] is gone or split off
        for layer, kinds in self.method.vision_layers().items():
            got = self.vision_qk.get(layer)
            if got is None or "q" not in got or "k" not in got:
                raise RuntimeError(f"vision layer {layer}'s attention was not captured; pass pixel_values so the "
                                   f"vision tower runs with the method attached")
            attn = self.p.vision_layers[layer].self_attn
            heads = getattr(attn, "num_heads", None) or attn.config.num_attention_heads
            q, k = got["q"], got["k"]
            B, N, _ = k.shape
            k4 = k.view(B, N, heads, -1).transpose(1, 2)
            q4 = q.view(B, N, heads, -1).transpose(1, 2)
            scale = getattr(attn, "scale", None) or getattr(attn, "scaling", None) or k4.shape[-1] ** -0.5
            if "cls" in kinds:
                p = torch.softmax((q4[:, :, :1].float() @ k4.float().transpose(-1, -2)) * scale, -1)  # (B,H,1,N)
                ctx["cls"][layer] = p[:, :, 0, drop:].sum(1)
            if "mean" in kinds:
                p = torch.softmax((q4.float() @ k4.float().transpose(-1, -2)) * scale, -1)
                ctx["mean"][layer] = p.mean(1).mean(1)[:, drop:]
            if "keys" in kinds:
                ctx["keys"][layer] = k4.mean(1)[:, drop:]
        self.vision_qk.clear()
        return ctx

    def projector_forward(self, orig: Callable[[Tensor], Tensor]) -> Callable[..., Tensor]:
        method = self.method

        def forward(proj: nn.Module, x: Tensor, *a: Any, **kw: Any) -> Tensor:
            if method.is_identity and method.where is not None and not method.stages:
                self.image_sources = None
                return orig(x, *a, **kw)
            t0 = time.perf_counter()
            ctx = self.vision_context() if method.vision_layers() else {}
            self.vision_qk.clear()
            strategy = getattr(self.p.config, "vision_feature_select_strategy", "default")
            keep_cls = strategy == "full" and self.info.has_cls
            cls, body = (x[:, :1], x[:, 1:]) if keep_cls else (None, x)
            src = None
            if method.where == "pre":
                body, src, _ = method.reduce_image(body, ctx)
            dt = time.perf_counter() - t0
            if src is not None and getattr(proj, "takes_source_patches", False):  # a position-coding projector
                kw = {**kw, "source_patches": _with_cls(src) if keep_cls else src}
            y = orig(torch.cat([cls, body], 1) if keep_cls else body, *a, **kw)
            t0 = time.perf_counter()
            if method.where == "post":
                ycls, ybody = (y[:, :1], y[:, 1:]) if keep_cls else (None, y)
                ybody, src, _ = method.reduce_image(ybody, ctx)
                y = torch.cat([ycls, ybody], 1) if keep_cls else ybody
            if src is not None and method.positions == "keep":  # placeholders are filled in patch order
                order = src.argsort(1)
                src = src.gather(1, order)
                if keep_cls:
                    y = torch.cat([y[:, :1], _gather(y[:, 1:], order)], 1)
                else:
                    y = _gather(y, order)
            if src is not None and keep_cls:
                src = _with_cls(src)
            self.image_sources = src
            self._pending_reduce = dt + time.perf_counter() - t0
            return y

        return forward

    # ------------------------------------------------------------------ top-level / LlavaModel pre-hooks
    def top_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if kwargs.get("labels") is not None and not self.method.is_identity:
            raise ValueError("labels (a training loss) are not supported with visual token reduction: the reduced "
                             "sequence no longer lines up with them; compute the loss without tokenreduce applied")

    def llava_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kw = dict(kwargs)
        names = ("input_ids", "pixel_values", "attention_mask", "position_ids", "past_key_values", "inputs_embeds")
        for i, a in enumerate(args):  # positional -> keyword
            kw[names[i]] = a
        input_ids = kw.get("input_ids")
        cache = kw.get("past_key_values")
        mm = kw.get("mm_encoder_outputs") or {}
        has_images = kw.get("pixel_values") is not None or mm.get("image") is not None
        prefill = cache is None or cache.get_seq_length() == 0
        if cache is not None and type(cache).__name__ != "DynamicCache":
            raise ValueError(f"{type(cache).__name__} is not supported with visual token reduction (per-layer cache "
                             f"lengths differ after pruning); use the default DynamicCache (no cache_implementation)")
        if input_ids is None:
            if has_images or (not prefill and self.plan is not None):
                raise NotImplementedError("tokenreduce's VLM adapter needs input_ids (it locates the <image> "
                                          "placeholders there); inputs_embeds alone are not supported")
            self.phase = "off"
            return (), kw
        vis = input_ids == self.image_token
        if not prefill:  # (a generated token may be the <image> id: without images it is plain text, as in HF)
            if has_images:
                raise NotImplementedError("new images after the prompt (a cache that is already filled) are not "
                                          "supported with visual token reduction; start a new generation")
            self._decode_translate(kw, cache)
            return (), kw
        self.plan = None
        if has_images and not vis.any():
            raise ValueError(f"the prompt has no {self._image_word()} token (id {self.image_token}) but images were "
                             f"given: put one {self._image_word()} placeholder per image in each prompt")
        if not has_images:
            if vis.any():
                raise ValueError(f"the prompt holds {int(vis.sum())} {self._image_word()} tokens but no pixel_values "
                                 f"(or image features) were given")
            self.phase = "off"
            return (), kw
        n_img = self._count_images(kw, vis)
        self._images_per_sample = n_img / input_ids.shape[0]
        # before the LLM: make sure the features are reduced, then drop the surplus placeholders
        if self.method.where is not None and not (self.method.is_identity and not self.method.stages):
            if kw.get("pixel_values") is not None:
                feats = module.get_image_features(
                    pixel_values=kw.pop("pixel_values"), vision_feature_layer=kw.get("vision_feature_layer"),
                    vision_feature_select_strategy=kw.get("vision_feature_select_strategy"),
                    image_sizes=kw.get("image_sizes"), return_dict=True)
                kw["pixel_values"] = None
                kw["mm_encoder_outputs"] = {**mm, "image": feats}
                mm = kw["mm_encoder_outputs"]
            lengths = [int(f.shape[0]) for f in mm["image"].pooler_output]
            if len(lengths) != n_img:
                raise ValueError(f"image count mismatch: {len(lengths)} image feature sets for {n_img} placeholder runs")
            self._compact(kw, vis, lengths)
        else:
            self.image_sources = None
            am = kw.get("attention_mask")
            real = torch.ones_like(input_ids, dtype=torch.bool) if am is None else am.bool()
            zero = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
            self._base = (input_ids.shape[1], input_ids.shape[1], real, zero, False, zero)
        self._lm_ids = kw["input_ids"]
        self.phase = "prefill"
        return (), kw

    def _image_word(self) -> str:
        return "<image>"

    def _count_images(self, kw: dict, vis: Tensor) -> int:
        mm = kw.get("mm_encoder_outputs") or {}
        if kw.get("pixel_values") is not None:
            pv = kw["pixel_values"]
            n_given = pv.shape[0] if isinstance(pv, Tensor) else len(pv)
        else:
            n_given = len(mm["image"].pooler_output)
        counts = vis.sum(1)
        per = self.info.tokens_per_image
        if self.info.grid is not None and per > 0:
            bad = [(b, int(c)) for b, c in enumerate(counts.tolist()) if c % per]
            if bad or int(counts.sum()) // per != n_given:
                raise ValueError(
                    f"image count does not match: the prompts hold {counts.tolist()} {self._image_word()} tokens "
                    f"({per} per image, so {[c / per for c in counts.tolist()]} images) but {n_given} images were "
                    f"given")
        return n_given

    def _compact(self, kw: dict, vis: Tensor, lengths: list[int]) -> None:
        """Keep ``lengths[i]`` placeholders of image i and re-pad. ``positions="compact"``: the first
        ``lengths[i]``, positions re-indexed; ``"keep"``: those in the slots of the kept tokens' source
        patches (original position ids)."""
        ids = kw["input_ids"]
        B, L = ids.shape
        am = kw.get("attention_mask")
        real = torch.ones_like(ids, dtype=torch.bool) if am is None else am.bool()
        per = self.info.tokens_per_image
        flat_rank = vis.flatten().cumsum(0).view(B, L) - 1  # running index over all placeholders
        img = torch.where(vis, flat_rank // per, -1)
        within = torch.where(vis, flat_rank % per, -1)
        lens = torch.tensor(lengths, device=ids.device)
        keep_pos = self.method.positions == "keep"
        src = self.image_sources
        if keep_pos:
            if src is None or src.shape[0] != len(lengths):
                raise ValueError("positions='keep' needs the kept tokens' source patches: pass pixel_values (the "
                                 "method reduces the features itself), not precomputed image features")
            slot = torch.zeros(len(lengths), per, dtype=torch.bool, device=ids.device)
            slot.scatter_(1, self._slots(src), True)
            if (slot.sum(1) != lens).any():
                raise RuntimeError("positions='keep' needs distinct source patches per image token")
            keep_tok = real & (~vis | slot[img.clamp(min=0), within.clamp(min=0)])
        else:
            keep_tok = real & (~vis | (within < lens[img.clamp(min=0)]))
        removed_before = torch.cumsum((real & ~keep_tok).long(), 1)
        pos = kw.get("position_ids")
        if pos is None:
            pos = torch.arange(L, device=ids.device).expand(B, L)
        pos = pos.expand(B, L) if keep_pos else pos.expand(B, L) - removed_before
        n = keep_tok.sum(1)
        L2 = int(n.max())
        pad_left = bool(real[:, -1].all()) and not bool(real[:, 0].all()) or bool(real.all())
        key = torch.arange(L, device=ids.device).expand(B, L).clone()
        big = L + 1
        order = torch.argsort(torch.where(keep_tok, key, -big if pad_left else big), dim=1, stable=True)
        order = order[:, L - L2:] if pad_left else order[:, :L2]
        new_real = keep_tok.gather(1, order)
        pad_id = self.p.config.text_config.pad_token_id if getattr(self.p.config, "text_config", None) else None
        pad_id = 0 if pad_id is None else int(pad_id)
        kw["input_ids"] = torch.where(new_real, ids.gather(1, order), torch.full_like(ids[:, :L2], pad_id))
        kw["position_ids"] = torch.where(new_real, pos.gather(1, order), torch.ones_like(order))
        if am is not None or not bool(new_real.all()):
            kw["attention_mask"] = new_real.long()
        removed = (real & ~keep_tok).sum(1)
        self._base = (L, L2, new_real, removed, True, torch.zeros_like(removed) if keep_pos else removed)

    def _slots(self, src: Tensor) -> Tensor:
        """Placeholder slot (within an image's ``per`` placeholders) of each reduced token: its source patch,
        after the [CLS] slot when the features keep [CLS] (source -1)."""
        has_cls = bool((src < 0).any())
        return src + 1 if has_cls else src

    def _decode_translate(self, kw: dict, cache: Any) -> None:
        plan = self.plan
        if plan is None or plan.cache() is not cache:
            self.phase = "off"
            return
        self.phase = "decode"
        if not plan.compacted:
            return
        ids = kw["input_ids"]
        B, q = ids.shape
        t_plus_q = cache.get_seq_length() - plan.base_len + q
        am = kw.get("attention_mask")
        if am is not None:
            if am.shape[1] != plan.orig_len + t_plus_q:
                raise ValueError(f"attention_mask has {am.shape[1]} columns; expected the prompt's {plan.orig_len} + "
                                 f"{t_plus_q} generated/new tokens")
            new_cols = am[:, plan.orig_len:]
        else:
            new_cols = torch.ones(B, t_plus_q, dtype=torch.long, device=ids.device)
        kw["attention_mask"] = torch.cat([plan.base_real.long(), new_cols.long()], 1)
        pos = kw.get("position_ids")
        if pos is None:  # the unreduced prompt's numbering: its real tokens + generated so far
            start = plan.base_real.sum(1) + plan.base_removed + (t_plus_q - q)
            pos = start[:, None] + torch.arange(q, device=ids.device)[None]
        kw["position_ids"] = pos - plan.base_shift[:, None]

    # ------------------------------------------------------------------ language model hooks
    def lm_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.dec_cache.clear()
        self.lm_kwargs = kwargs
        if self.phase != "prefill":
            if self.phase == "decode":
                self._cur_stats = VlmStats(method=self.name)
            return
        emb = kwargs.get("inputs_embeds")
        am = kwargs.get("attention_mask")
        B, L = emb.shape[:2]
        real = torch.ones(B, L, dtype=torch.bool, device=emb.device) if am is None else am.bool()
        visual = (self._lm_ids == self.image_token) & real
        pos = kwargs.get("position_ids")
        if pos is None:
            pos = torch.arange(L, device=emb.device)[None]
        pos = pos.expand(B, L)
        last = (torch.arange(L, device=emb.device)[None] * real).argmax(1)
        pad_left = bool(real[:, -1].all())
        self.cur = _Cur(index=torch.arange(L, device=emb.device).expand(B, L), real=real, visual=visual, pos=pos,
                        lm_input=emb, lm_visual=visual, lm_real=real, n_visual0=visual.sum(1),
                        lm_last_pos=pos.gather(1, last[:, None])[:, 0], pad_left=pad_left)
        st = VlmStats(method=self.name, input_tokens=int(self._base[0]))
        st.llm_input_tokens = float(real.sum(1).float().mean())
        st.visual_input = float(visual.sum(1).float().mean())
        st.reduce_seconds = getattr(self, "_pending_reduce", 0.0)
        self._pending_reduce = 0.0
        st.kept_patches = self._kept_patches(visual)
        self._cur_stats = st
        self._stages: list[_Stage] = []

    def _kept_patches(self, visual: Tensor) -> list[list[list[int]]]:
        """Per sample, per image: patch indices of the visual tokens at the LLM input (one list per sample
        when images have no fixed token count, e.g. anyres)."""
        src = self.image_sources
        per = int(src.shape[1]) if src is not None else self.info.tokens_per_image
        out: list[list[list[int]]] = []
        i = 0
        for c in visual.sum(1).tolist():
            if per <= 0:
                out.append([list(range(c))])
                continue
            imgs: list[list[int]] = []
            for _ in range(c // per):
                imgs.append(src[i].tolist() if src is not None else list(range(per)))
                i += 1
            out.append(imgs)
        return out

    def _removed_mean(self) -> float:
        """Mean tokens removed before the LLM (added back for the unreduced FLOPs estimate)."""
        return float(self._base[3].float().mean()) if self._base[4] else 0.0

    def lm_post(self, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        if self.phase == "prefill" and self.cur is not None:
            st = self._cur_stats
            cache = kwargs.get("past_key_values") if kwargs.get("past_key_values") is not None else getattr(out, "past_key_values", None)
            if cache is not None and hasattr(cache, "layers"):
                st.kv_tokens = [int(l.keys.shape[-2]) if getattr(l, "keys", None) is not None else 0 for l in cache.layers]
                st.kv_bytes = int(sum(l.keys.numel() * l.keys.element_size() + l.values.numel() * l.values.element_size()
                                      for l in cache.layers if getattr(l, "keys", None) is not None))
            st.final_tokens = self.cur.real.sum(1).tolist()
            if self.info.grid is not None:
                from ..accounting.flops import vlm_prefill_flops

                n_img = self._images_per_sample
                f = vlm_prefill_flops(self.p.config, st, st.llm_input_tokens, n_img)
                full = float(self._base[2].sum(1).float().mean()) + self._removed_mean()
                f0 = vlm_prefill_flops(self.p.config, None, full, n_img)
                st.flops = {"gflops": f["gflops"], "gflops_unreduced": f0["gflops"]}
            if cache is not None:
                self.plan = _Plan(cache=weakref.ref(cache), orig_len=int(self._base[0]), base_len=int(self._base[1]),
                                  base_real=self._base[2], base_shift=self._base[5], base_removed=self._base[3],
                                  stages=self._stages,
                                  compacted=bool(self._base[4]))
            self._stats = st
            self.cur = None
            self.image_sources = None  # used up: never carried over to another prompt's features
        self.phase = "off"

    # ------------------------------------------------------------------ decoder layer pre-hooks
    def layer_pre(self, layer: int) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if self.phase == "prefill" and self.cur is not None:
                return self._prefill_layer(layer, module, args, kwargs)
            if self.phase == "decode" and self.plan is not None and self.plan.stages and layer >= self.plan.stages[0].layer:
                return self._decode_layer(layer, args, kwargs)
            return None
        return hook

    def _prefill_layer(self, layer: int, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        cur = self.cur
        h = args[0] if args else kwargs["hidden_states"]
        st = self._cur_stats
        if layer in self.stage_of_layer and not self.method.is_identity:
            t0 = time.perf_counter()
            h = self._reduce(self.stage_of_layer[layer], layer, h, kwargs)
            st.reduce_seconds += time.perf_counter() - t0
        if cur.changed:
            kwargs = dict(kwargs)
            kwargs["attention_mask"] = cur.mask4d
            kwargs["position_embeddings"] = cur.pe
            kwargs["position_ids"] = cur.pos
        if layer in self.capture_layers:
            cur.inputs[layer] = (h, kwargs.get("position_embeddings"))
        st.tokens_attn.append(float(cur.real.sum(1).float().mean()))
        st.tokens_mlp.append(st.tokens_attn[-1])
        st.visual_tokens.append(float(cur.visual.sum(1).float().mean()))
        if args:
            return (h, *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = h
        return args, kwargs

    def _attn_fn(self, h_now: Tensor, pe_now: Any) -> Callable[[int, Tensor], Tensor]:
        cur = self.cur

        def attn(layer: int, q_idx: Tensor) -> Tensor:
            if layer in cur.inputs:
                h, pe = cur.inputs[layer]
            else:
                h, pe = h_now, pe_now
            if h.shape[1] != cur.real.shape[1]:
                raise RuntimeError(f"attention of layer {layer} was computed on a different token set")
            return self._attention_rows(layer, h, pe, q_idx, cur.real)

        return attn

    def _attention_rows(self, layer: int, h: Tensor, pe: tuple[Tensor, Tensor], q_idx: Tensor, real: Tensor) -> Tensor:
        """Attention of the tokens ``q_idx`` (B, Q) to all tokens at ``layer``, from its own q/k only."""
        mod = self.p.layers[layer]
        a = mod.self_attn
        x = mod.input_layernorm(h)
        B, L, _ = x.shape
        hd = a.head_dim
        xq = _gather(x, q_idx)
        q = a.q_proj(xq).view(B, q_idx.shape[1], -1, hd)
        k = a.k_proj(x).view(B, L, -1, hd)
        if hasattr(a, "q_norm"):
            q, k = a.q_norm(q), a.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos, sin = pe
        cos, sin = cos.expand(B, -1, -1), sin.expand(B, -1, -1)
        rope = sys.modules[type(a).__module__].apply_rotary_pos_emb
        q, _ = rope(q, q, _gather(cos, q_idx), _gather(sin, q_idx))
        k, _ = rope(k, k, cos, sin)
        allowed = real[:, None, :] & (torch.arange(L, device=x.device)[None, None, :] <= q_idx[:, :, None])
        return attention_probs(q, k, a.scaling, allowed[:, None]).flatten(1, 2)  # (B, H, Q, L)

    def _reduce(self, s: int, layer: int, h: Tensor, kwargs: dict) -> Tensor:
        cur = self.cur
        pe_now = cur.pe if cur.changed else kwargs.get("position_embeddings")
        last = (torch.arange(cur.real.shape[1], device=h.device)[None] * cur.real).argmax(1)
        view = StageView(stage=s, layer=layer, hidden=h, real=cur.real, visual=cur.visual, last=last, index=cur.index,
                         lm_input=cur.lm_input, lm_visual=cur.lm_visual, lm_real=cur.lm_real,
                         attn=self._attn_fn(h, pe_now), n_visual0=cur.n_visual0)
        dec: StageDecision = self.method.reduce_stage(view)
        keep = cur.real & (~cur.visual | (dec.keep & cur.visual))
        B, L, _ = h.shape
        arange = torch.arange(L, device=h.device, dtype=torch.float64).expand(B, L)
        hs, valid, keys, idx, vis, pos = [h], [keep], [arange], [cur.index], [cur.visual], [cur.pos]
        if dec.extra is not None and dec.extra.shape[1] > 0:
            E = dec.extra.shape[1]
            last_vis = torch.where(cur.visual, torch.arange(L, device=h.device)[None], -1).amax(1).double()
            hs.append(dec.extra.to(h.dtype))
            valid.append(dec.extra_valid)
            keys.append(last_vis[:, None] + 0.5 + torch.arange(E, device=h.device, dtype=torch.float64)[None] * 1e-3)
            idx.append(torch.full((B, E), -1, device=h.device, dtype=torch.long))
            vis.append(dec.extra_valid.clone())
            pos.append(cur.pos.gather(1, last_vis.long().clamp(min=0)[:, None]).expand(B, E))
        hs_, valid_, keys_ = torch.cat(hs, 1), torch.cat(valid, 1), torch.cat(keys, 1)
        idx_, vis_, pos_ = torch.cat(idx, 1), torch.cat(vis, 1), torch.cat(pos, 1)
        n = valid_.sum(1)
        L2 = int(n.max())
        big = float(hs_.shape[1] + 10)
        order = torch.argsort(torch.where(valid_, keys_, -big if cur.pad_left else big), dim=1, stable=True)
        order = order[:, hs_.shape[1] - L2:] if cur.pad_left else order[:, :L2]
        real2 = valid_.gather(1, order)
        h2 = _gather(hs_, order)
        vis2 = vis_.gather(1, order) & real2
        idx2 = torch.where(real2, idx_.gather(1, order), -1)
        pos2 = pos_.gather(1, order)
        if self.method.positions == "compact":
            first = torch.where(real2, pos2, torch.iinfo(pos2.dtype).max).amin(1)
            first = torch.where(n > 0, first, torch.zeros_like(first))
            rank = real2.long().cumsum(1) - 1
            pos2 = torch.where(real2, first[:, None] + rank, torch.ones_like(pos2))
        last2 = (torch.arange(L2, device=h.device)[None] * real2).argmax(1)
        shift = cur.lm_last_pos - pos2.gather(1, last2[:, None])[:, 0]
        cur.index, cur.real, cur.visual, cur.pos = idx2, real2, vis2, pos2
        cur.pe = self.p.lm.rotary_emb(h2, pos2)
        sdpa_fast = self.attn_impl == "sdpa" and bool(real2.all())
        cur.mask4d = None if sdpa_fast else _mask4d(_causal_allowed(real2), h.dtype)
        cur.changed = True
        cur.inputs.clear()
        self._stages.append(_Stage(layer, real2, shift, self.method.positions == "compact"))
        self._cur_stats.stage_patches.append(self._stage_patch_list(idx2, vis2))
        self._cur_stats.stage_layers.append(layer)
        self._cur_stats.stage_index.append([idx2[b][real2[b]].tolist() for b in range(B)])
        self._cur_stats.stage_positions.append([pos2[b][real2[b]].tolist() for b in range(B)])
        return h2

    def _stage_patch_list(self, idx: Tensor, vis: Tensor) -> list[list[int]]:
        """Per sample, LLM-input visual-token ordinal of the visual tokens left (recycled: -1)."""
        ordinal = self.cur.lm_visual.long().cumsum(1) - 1
        ords = torch.where(idx >= 0, ordinal.gather(1, idx.clamp(min=0)), -1)
        return [ords[b][vis[b]].tolist() for b in range(idx.shape[0])]

    def _decode_layer(self, layer: int, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        plan = self.plan
        s = max(i for i, st in enumerate(plan.stages) if st.layer <= layer)
        if s not in self.dec_cache:
            stg = plan.stages[s]
            h = args[0] if args else kwargs["hidden_states"]
            B, q = h.shape[:2]
            cache = kwargs.get("past_key_values")
            if cache is None:
                raise RuntimeError("decoding after a reduced prefill needs the cache the prefill filled")
            past = cache.layers[layer].get_seq_length()
            t = past - stg.real.shape[1]
            am = self.lm_kwargs.get("attention_mask")
            if am is not None and am.dim() == 2:
                new_cols = am[:, plan.base_len:].bool()
                if new_cols.shape[1] != t + q:
                    raise ValueError(f"attention mask covers {new_cols.shape[1]} new tokens, the cache of layer {layer} "
                                     f"expects {t + q}")
            else:
                new_cols = torch.ones(B, t + q, dtype=torch.bool, device=h.device)
            full = torch.cat([stg.real, new_cols], 1)
            K = full.shape[1]
            qpos = stg.real.shape[1] + t + torch.arange(q, device=h.device)
            allowed = full[:, None, :] & (torch.arange(K, device=h.device)[None, None, :] <= qpos[None, :, None])
            mask = None if (q == 1 and bool(allowed.all())) else _mask4d(allowed, h.dtype)
            pe = kwargs.get("position_embeddings")
            if stg.compact:
                pid = kwargs.get("position_ids")
                pid = pid.expand(B, q) - stg.shift[:, None]
                pe = self.p.lm.rotary_emb(h, pid)
            self.dec_cache[s] = (mask, pe)
        mask, pe = self.dec_cache[s]
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = mask
        kwargs["position_embeddings"] = pe
        return args, kwargs


class VlmAdapter:
    """Adapter for transformers' LLaVA family (integration point ``vlm-visual``)."""

    name = "transformers LLaVA VLMs (LlavaForConditionalGeneration; LLaVA-NeXT/OneVision for inside-LLM methods)"
    integration = "vlm-visual"

    def matches(self, model: nn.Module) -> bool:
        return type(model).__name__ in LLAVA_CLASSES and hasattr(model, "config") and \
            hasattr(model.config, "image_token_id")

    def attach(self, model: nn.Module, method: Any, method_name: str) -> Handle:
        if not isinstance(method, VlmMethod):
            raise TypeError(f"{method_name} is not a VLM method")
        parts = _parts(model)
        impl = parts.lm.config._attn_implementation
        if impl not in ("sdpa", "eager"):
            raise ValueError(f"attention implementation {impl!r} is not supported by the VLM adapter; "
                             f"accepted: 'sdpa', 'eager'")
        info = _model_info(model, parts)
        if method.where is not None and info.grid is None:
            raise ValueError(f"{method_name} reduces tokens before the LLM, which needs one patch grid per image "
                             f"(LLaVA-1.5 style); {type(model).__name__} packs anyres crops. Use an inside-LLM "
                             f"method (fastv, sparsevlm, pdrop)")
        method.setup(info)
        run = _Run(model, method, method_name, parts, info)
        run.stage_of_layer = {l: i for i, l in enumerate(method.stages)}
        p = Patcher()
        try:
            if method.where is not None:
                for layer in method.vision_layers():
                    if not 0 <= layer < len(parts.vision_layers):
                        raise ValueError(f"vision layer {layer} out of range (tower has {len(parts.vision_layers)})")
                    attn = parts.vision_layers[layer].self_attn
                    p.hook(attn.q_proj.register_forward_hook(run.vision_hook(layer, "q")))
                    p.hook(attn.k_proj.register_forward_hook(run.vision_hook(layer, "k")))
                orig = parts.projector.forward
                p.set_method(parts.projector, "forward", run.projector_forward(orig))
            if parts.llava is not model:
                p.hook(model.register_forward_pre_hook(run.top_pre, with_kwargs=True))
            p.hook(parts.llava.register_forward_pre_hook(run.llava_pre, with_kwargs=True))
            p.hook(parts.lm.register_forward_pre_hook(run.lm_pre, with_kwargs=True))
            p.hook(parts.lm.register_forward_hook(run.lm_post, with_kwargs=True))
            for i, layer in enumerate(parts.layers):
                p.hook(layer.register_forward_pre_hook(run.layer_pre(i), with_kwargs=True))
        except Exception:
            p.undo()
            raise
        return Handle(model, method_name, method, p, run.stats)


def _model_info(model: nn.Module, parts: _Parts) -> ModelInfo:
    cfg = parts.config
    vcfg = cfg.vision_config
    depth = len(parts.layers)
    vdepth = len(parts.vision_layers)
    fl = cfg.vision_feature_layer
    if not isinstance(fl, int):
        raise NotImplementedError(f"vision_feature_layer={fl!r}: multi-layer features are not supported")
    # hidden_states[fl] is the output of encoder layer fl-1 (fl >= 1) / vdepth + fl (fl < 0)
    feature_layer = fl - 1 if fl > 0 else vdepth + fl
    has_cls = hasattr(getattr(getattr(parts.llava.vision_tower, "vision_model", parts.llava.vision_tower),
                              "embeddings", None), "class_embedding")
    grid = None
    per = 0
    if type(model).__name__ in _GRID_CLASSES:
        size, patch = vcfg.image_size, vcfg.patch_size
        grid = (size // patch, size // patch)
        per = grid[0] * grid[1] + (1 if cfg.vision_feature_select_strategy == "full" and has_cls else 0)
    return ModelInfo(depth=depth, vision_depth=vdepth, feature_layer=feature_layer, grid=grid, has_cls=has_cls,
                     tokens_per_image=per)


register_adapter(VlmAdapter())
