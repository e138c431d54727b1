"""The before-the-LLM path: the projector's ``forward`` wrapped to reduce each image's features, the
``<image>`` placeholders the reduction left without a token dropped from the prompt (ragged rows re-padded,
positions re-indexed or kept), and during decoding generate's 2D mask and position ids translated to that
shorter prompt. Also the checks of what a prompt may hold (labels, cache type, images vs placeholders)."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ...core.state import batched_index_select, check_finite
from ...methods.vlm import ModelInfo, VlmMethod
from .parts import LlavaParts
from .state import LlmInput, RunState
from .tensors import packed_order
from .vision import VisionAttention

__all__ = ["BeforeLlm"]

IMAGE_WORD = "<image>"


def _with_cls(src: Tensor) -> Tensor:
    """Source patches (B, K) of kept tokens with the CLS token's -1 (no patch) in front."""
    return torch.cat([torch.full_like(src[:, :1], -1), src], 1)


class BeforeLlm:
    """Hooks of the model's top level, its ``LlavaModel`` and projector (see the module docstring)."""

    def __init__(self, state: RunState, method: VlmMethod, parts: LlavaParts, info: ModelInfo,
                 vision: VisionAttention) -> None:
        self.state, self.method, self.p, self.info, self.vision = state, method, parts, info, vision
        self.image_token = int(parts.config.image_token_id)
        cfg = parts.config
        ids = {getattr(c, f"{n}_token_id", None) for c in (cfg, getattr(cfg, "text_config", None)) if c is not None
               for n in ("pad", "bos", "eos")}
        #: token ids that are never a question's text (for ``needs_question`` methods)
        self.special_ids = sorted(int(t) for t in ids if isinstance(t, int))

    # ------------------------------------------------------------------ projector
    def projector_forward(self, orig: Callable[[Tensor], Tensor]) -> Callable[..., Tensor]:
        """The projector's ``forward``: reduce each image's vision features (``where="pre"``) or projected
        features (``"post"``); record every kept token's source patch in ``state.image_sources``."""
        method, state = self.method, self.state

        def forward(proj: nn.Module, x: Tensor, *a: Any, **kw: Any) -> Tensor:
            check_finite(x, "the vision features of pixel_values")
            state.image_sources = state.image_out = None
            if method.is_identity and method.where is not None and not method.stages:
                return orig(x, *a, **kw)
            t0 = time.perf_counter()
            ctx = self.vision.context(method.vision_layers()) if method.vision_layers() else {}
            self.vision.clear()
            keep_cls = self._keep_cls()
            cls, body = (x[:, :1], x[:, 1:]) if keep_cls else (None, x)
            src = None
            if method.where == "pre":
                body, src, _ = method.reduce_image(body, ctx)
            dt = time.perf_counter() - t0
            if src is not None and getattr(proj, "takes_source_patches", False):  # a position-coding projector
                kw = {**kw, "source_patches": _with_cls(src) if keep_cls else src}
            y = orig(torch.cat([cls, body], 1) if keep_cls else body, *a, **kw)
            t0 = time.perf_counter()
            if method.where == "post" and not method.needs_question:  # a question's method: in llava_pre
                y, src = self._reduce_post(y, src, ctx, keep_cls)
            elif src is not None:
                y, src = self._finish(y, src, keep_cls)
            state.image_sources, state.image_out = src, y
            state.pending_reduce = dt + time.perf_counter() - t0
            return y

        return forward

    def _keep_cls(self) -> bool:
        return getattr(self.p.config, "vision_feature_select_strategy", "default") == "full" and self.info.has_cls

    def _reduce_post(self, y: Tensor, src: Tensor | None, ctx: dict[str, Any], keep_cls: bool
                     ) -> tuple[Tensor, Tensor | None]:
        """The method's reduction of projected features ``y`` (n_img, [CLS +] N, D), then :meth:`_finish`."""
        ycls, ybody = (y[:, :1], y[:, 1:]) if keep_cls else (None, y)
        ybody, src, _ = self.method.reduce_image(ybody, ctx)
        return self._finish(torch.cat([ycls, ybody], 1) if keep_cls else ybody, src, keep_cls)

    def _finish(self, y: Tensor, src: Tensor | None, keep_cls: bool) -> tuple[Tensor, Tensor | None]:
        """Kept tokens in patch order when their positions are kept (the placeholders are filled in that
        order); the CLS token's source (-1) in front."""
        if src is not None and self.method.positions == "keep":
            order = src.argsort(1)
            src = src.gather(1, order)
            if keep_cls:
                y = torch.cat([y[:, :1], batched_index_select(y[:, 1:], order)], 1)
            else:
                y = batched_index_select(y, order)
        if src is not None and keep_cls:
            src = _with_cls(src)
        return y, src

    def _reduce_for_question(self, module: nn.Module, kw: dict, vis: Tensor) -> None:
        """A question-aware method before the LLM (``needs_question``): generate encodes the images before
        the first forward, without the prompt, so the reduction happens here, where ``input_ids`` are: each
        image's projected features with ``ctx["question"]`` = (embeddings (n_img, L, D), mask (n_img, L)) of
        its own prompt's text tokens (no placeholders, padding or special tokens)."""
        t0 = time.perf_counter()
        mm = kw["mm_encoder_outputs"]
        feats = mm["image"]
        pooled = feats.pooler_output
        y = pooled if isinstance(pooled, Tensor) else torch.stack(list(pooled))
        ids = kw["input_ids"]
        am = kw.get("attention_mask")
        real = torch.ones_like(ids, dtype=torch.bool) if am is None else am.bool()
        text = real & ~vis & ~torch.isin(ids, torch.tensor(self.special_ids, dtype=ids.dtype, device=ids.device))
        owner = torch.repeat_interleave(torch.arange(ids.shape[0], device=ids.device),
                                        vis.sum(1) // self.info.tokens_per_image)
        emb = module.get_input_embeddings()(ids)
        ctx = {"question": (emb[owner].to(y.dtype), text[owner])}
        y, src = self._reduce_post(y, None, ctx, self._keep_cls())
        out = copy.copy(feats)
        out.pooler_output = y if isinstance(pooled, Tensor) else list(y)
        kw["mm_encoder_outputs"] = {**mm, "image": out}
        self.state.image_sources, self.state.image_out = src, y
        self.state.pending_reduce = (self.state.pending_reduce or 0.0) + time.perf_counter() - t0

    # ------------------------------------------------------------------ top-level / LlavaModel pre-hooks
    def top_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if kwargs.get("labels") is not None and not self.method.is_identity:
            raise ValueError("labels (a training loss) are not supported with visual token reduction: the reduced "
                             "sequence no longer lines up with them; compute the loss without tokenreduce applied")

    def llava_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Sets the phase of this forward; in a prefill with images, reduces the features (through the
        projector) and drops the surplus placeholders; in decoding, translates mask and positions."""
        state = self.state
        kw = dict(kwargs)
        names = ("input_ids", "pixel_values", "attention_mask", "position_ids", "past_key_values", "inputs_embeds")
        for i, a in enumerate(args):  # positional -> keyword
            kw[names[i]] = a
        for name in ("pixel_values", "inputs_embeds"):
            if isinstance(kw.get(name), Tensor):
                check_finite(kw[name], name)
        input_ids = kw.get("input_ids")
        cache = kw.get("past_key_values")
        mm = kw.get("mm_encoder_outputs") or {}
        for f in getattr(mm.get("image"), "pooler_output", None) or ():  # generate encodes pixel_values first
            check_finite(f, "the image features of pixel_values")
        has_images = kw.get("pixel_values") is not None or mm.get("image") is not None
        prefill = cache is None or cache.get_seq_length() == 0
        if cache is not None and type(cache).__name__ != "DynamicCache":
            raise ValueError(f"{type(cache).__name__} is not supported with visual token reduction (per-layer cache "
                             f"lengths differ after pruning); use the default DynamicCache (no cache_implementation)")
        if input_ids is None:
            if has_images or (not prefill and state.plan is not None):
                raise NotImplementedError("tokenreduce's VLM adapter needs input_ids (it locates the <image> "
                                          "placeholders there); inputs_embeds alone are not supported")
            state.phase = "off"
            return (), kw
        vis = input_ids == self.image_token
        if not prefill:  # (a generated token may be the <image> id: without images it is plain text, as in HF)
            if has_images:
                raise NotImplementedError("new images after the prompt (a cache that is already filled) are not "
                                          "supported with visual token reduction; start a new generation")
            self._decode_translate(kw, cache)
            return (), kw
        state.plan = None
        if has_images and not vis.any():
            raise ValueError(f"the prompt has no {IMAGE_WORD} token (id {self.image_token}) but images were "
                             f"given: put one {IMAGE_WORD} placeholder per image in each prompt")
        if not has_images:
            if vis.any():
                raise ValueError(f"the prompt holds {int(vis.sum())} {IMAGE_WORD} tokens but no pixel_values "
                                 f"(or image features) were given")
            state.phase = "off"
            return (), kw
        if self.method.where is not None and kw.get("pixel_values") is None:
            self._follow_expansion(kw, vis)
            mm = kw["mm_encoder_outputs"]
        n_img = self._count_images(kw, vis)
        state.images_per_sample = n_img / input_ids.shape[0]
        # before the LLM: make sure the features are reduced, then drop the surplus placeholders
        if self.method.where is not None and not (self.method.is_identity and not self.method.stages):
            if kw.get("pixel_values") is not None:
                feats = module.get_image_features(
                    pixel_values=kw.pop("pixel_values"), vision_feature_layer=kw.get("vision_feature_layer"),
                    vision_feature_select_strategy=kw.get("vision_feature_select_strategy"),
                    image_sizes=kw.get("image_sizes"), return_dict=True)
                kw["pixel_values"] = None
                kw["mm_encoder_outputs"] = {**mm, "image": feats}
            if self.method.needs_question:
                self._reduce_for_question(module, kw, vis)
            mm = kw["mm_encoder_outputs"]
            lengths = [int(f.shape[0]) for f in mm["image"].pooler_output]
            if len(lengths) != n_img:
                raise ValueError(f"image count mismatch: {len(lengths)} image feature sets for {n_img} placeholder runs")
            self._compact(kw, vis, lengths)
        else:
            state.image_sources = None
            am = kw.get("attention_mask")
            real = torch.ones_like(input_ids, dtype=torch.bool) if am is None else am.bool()
            zero = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
            L = input_ids.shape[1]
            state.prompt = LlmInput(orig_len=L, length=L, real=real, removed=zero, compacted=False, shift=zero,
                                    visual0=(vis & real).sum(1))
        state.lm_ids = kw["input_ids"]
        state.phase = "prefill"
        return (), kw

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
                    f"image count does not match: the prompts hold {counts.tolist()} {IMAGE_WORD} tokens "
                    f"({per} per image, so {[c / per for c in counts.tolist()]} images) but {n_given} images were "
                    f"given")
        return n_given

    def _follow_expansion(self, kw: dict, vis: Tensor) -> None:
        """generate(num_beams=k) (or num_return_sequences=k) repeats each prompt k times, and the image
        features by matching the prompts' placeholder counts with the features' token counts, which a
        before-the-LLM reduction changed: the features end up grouped wrongly or lost ([A, B] -> [A, B, A, B]
        instead of [A, A, B, B]). When the prompts are k copies of the prompts whose images the projector just
        reduced, rebuild the features (and their source patches) from its output in row order."""
        y, feats = self.state.image_out, kw["mm_encoder_outputs"]["image"]
        pooled, ids = feats.pooler_output, kw["input_ids"]
        per = self.info.tokens_per_image
        if y is None or per <= 0:
            return
        n_need = int(vis.sum()) // per
        if n_need == y.shape[0] or n_need % y.shape[0]:
            return
        k = n_need // y.shape[0]
        B = ids.shape[0]
        if B % k or not bool((ids.view(B // k, k, -1) == ids[::k, None]).all()):
            return  # not k copies of each prompt: the count checks below explain the mismatch
        order, start = [], 0
        for c in (vis[::k].sum(1) // per).tolist():
            order += list(range(start, start + c)) * k
            start += c
        if start != y.shape[0]:
            return
        idx = torch.tensor(order, device=y.device)
        out = copy.copy(feats)
        out.pooler_output = y[idx] if isinstance(pooled, Tensor) else list(y[idx])
        kw["mm_encoder_outputs"] = {**kw["mm_encoder_outputs"], "image": out}
        if self.state.image_sources is not None:
            self.state.image_sources = self.state.image_sources[idx.to(self.state.image_sources.device)]

    # ------------------------------------------------------------------ prompt compaction
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
        src = self.state.image_sources
        if keep_pos:
            if src is None or src.shape[0] != len(lengths):
                raise ValueError("positions='keep' needs the kept tokens' source patches: pass pixel_values (the "
                                 "method reduces the features itself), not precomputed image features")
            slot = torch.zeros(len(lengths), per, dtype=torch.bool, device=ids.device)
            slot.scatter_(1, _slots(src), True)
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
        pad_left = bool(real[:, -1].all()) and not bool(real[:, 0].all()) or bool(real.all())
        order = packed_order(keep_tok, torch.arange(L, device=ids.device).expand(B, L), pad_left)
        L2 = order.shape[1]
        new_real = keep_tok.gather(1, order)
        pad_id = self.p.config.text_config.pad_token_id if getattr(self.p.config, "text_config", None) else None
        pad_id = 0 if pad_id is None else int(pad_id)
        kw["input_ids"] = torch.where(new_real, ids.gather(1, order), torch.full_like(ids[:, :L2], pad_id))
        kw["position_ids"] = torch.where(new_real, pos.gather(1, order), torch.ones_like(order))
        if am is not None or not bool(new_real.all()):
            kw["attention_mask"] = new_real.long()
        removed = (real & ~keep_tok).sum(1)
        self.state.prompt = LlmInput(orig_len=L, length=L2, real=new_real, removed=removed, compacted=True,
                                     shift=torch.zeros_like(removed) if keep_pos else removed,
                                     visual0=(vis & real).sum(1))

    # ------------------------------------------------------------------ decoding
    def _decode_translate(self, kw: dict, cache: Any) -> None:
        """generate's 2D mask and position ids (of the unreduced prompt) -> those of the compacted prompt."""
        state = self.state
        plan = state.plan
        if plan is None or plan.cache() is not cache:
            state.phase = "off"
            return
        state.phase = "decode"
        prompt = plan.prompt
        if not prompt.compacted:
            return
        ids = kw["input_ids"]
        B, q = ids.shape
        t_plus_q = cache.get_seq_length() - prompt.length + q
        am = kw.get("attention_mask")
        if am is not None:
            if am.shape[1] != prompt.orig_len + t_plus_q:
                raise ValueError(f"attention_mask has {am.shape[1]} columns; expected the prompt's {prompt.orig_len} + "
                                 f"{t_plus_q} generated/new tokens")
            new_cols = am[:, prompt.orig_len:]
        else:
            new_cols = torch.ones(B, t_plus_q, dtype=torch.long, device=ids.device)
        kw["attention_mask"] = torch.cat([prompt.real.long(), new_cols.long()], 1)
        pos = kw.get("position_ids")
        if pos is None:  # the unreduced prompt's numbering: its real tokens + generated so far
            start = prompt.real.sum(1) + prompt.removed + (t_plus_q - q)
            pos = start[:, None] + torch.arange(q, device=ids.device)[None]
        kw["position_ids"] = pos - prompt.shift[:, None]


def _slots(src: Tensor) -> Tensor:
    """Placeholder slot (within an image's ``per`` placeholders) of each reduced token: its source patch,
    after the [CLS] slot when the features keep [CLS] (source -1)."""
    has_cls = bool((src < 0).any())
    return src + 1 if has_cls else src
