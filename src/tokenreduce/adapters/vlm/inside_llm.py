"""The inside-the-LLM path: hooks on the language model and its decoder layers. At a stage layer the method
scores the visual tokens (attention rows of the last/rater text tokens computed from that layer's own q/k,
for those rows only), the hidden states are gathered, and that layer and all later ones get their own 4D
mask and rotary embeddings for the shorter sequence; their KV cache holds only the survivors. During
decoding each layer group gets the mask of its kept prompt tokens and positions shifted by the tokens
removed before them (when the method re-indexes positions). The language model's hooks also start and
finish each prefill's stats and decode plan (also for before-the-LLM methods)."""

from __future__ import annotations

import sys
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ...core.ops import attention_probs
from ...core.state import batched_index_select
from ...methods.vlm import ModelInfo, StageDecision, StageView, VlmMethod
from .parts import LlavaParts
from .state import DecodePlan, RunState, StagePlan, follow_cache
from .stats import VlmStats, finish_stats, record_cache, record_flops, record_layer, record_stage, start_stats
from .tensors import causal_allowed, last_real, mask4d, packed_order

__all__ = ["InsideLlm"]


@dataclass
class _Prefill:
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
    inputs: dict = field(default_factory=dict)  # layer -> (hidden, pe)


class InsideLlm:
    """Hooks of the language model and its decoder layers (see the module docstring)."""

    def __init__(self, state: RunState, method: VlmMethod, parts: LlavaParts, info: ModelInfo) -> None:
        self.state, self.method, self.p, self.info = state, method, parts, info
        self.attn_impl = parts.lm.config._attn_implementation
        self.image_token = int(parts.config.image_token_id)
        self.cur: _Prefill | None = None
        self.cur_stats = VlmStats(method=state.name)
        self.stages: list[StagePlan] = []
        self.stage_of_layer = {l: i for i, l in enumerate(method.stages)}
        score_layers = {method.score_layer(s) for s in range(len(method.stages))}
        self.capture_layers = {l for l in score_layers if l not in method.stages}
        self.dec_cache: dict[int, tuple[Tensor | None, tuple[Tensor, Tensor] | None]] = {}
        self.lm_kwargs: dict = {}

    # ------------------------------------------------------------------ language model hooks
    def lm_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        state = self.state
        self.dec_cache.clear()
        self.lm_kwargs = kwargs
        if state.phase != "prefill":
            if state.phase == "decode":
                self.cur_stats = VlmStats(method=state.name)
            return
        emb = kwargs.get("inputs_embeds")
        am = kwargs.get("attention_mask")
        B, L = emb.shape[:2]
        real = torch.ones(B, L, dtype=torch.bool, device=emb.device) if am is None else am.bool()
        visual = (state.lm_ids == self.image_token) & real
        pos = kwargs.get("position_ids")
        if pos is None:
            pos = torch.arange(L, device=emb.device)[None]
        pos = pos.expand(B, L)
        last = last_real(real)
        pad_left = bool(real[:, -1].all())
        self.cur = _Prefill(index=torch.arange(L, device=emb.device).expand(B, L), real=real, visual=visual, pos=pos,
                            lm_input=emb, lm_visual=visual, lm_real=real, n_visual0=visual.sum(1),
                            lm_last_pos=pos.gather(1, last[:, None])[:, 0], pad_left=pad_left)
        self.cur_stats = start_stats(state.name, state.prompt.orig_len, real, visual, state.prompt.visual0,
                                     state.pending_reduce, state.image_sources, self.info.tokens_per_image,
                                     self.method.fraction)
        state.pending_reduce = 0.0
        self.stages = []

    def lm_post(self, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        state = self.state
        if state.phase == "prefill" and self.cur is not None:
            st = self.cur_stats
            cache = kwargs.get("past_key_values") if kwargs.get("past_key_values") is not None else getattr(out, "past_key_values", None)
            if cache is not None and hasattr(cache, "layers"):
                record_cache(st, cache)
            st.final_tokens = self.cur.real.sum(1).tolist()
            prompt = state.prompt
            if self.info.grid is not None:
                removed = float(prompt.removed.float().mean()) if prompt.compacted else 0.0  # added back
                record_flops(st, self.p.config, state.images_per_sample,
                             float(prompt.real.sum(1).float().mean()) + removed)
            if cache is not None:
                state.plan = DecodePlan(cache=weakref.ref(cache), prompt=prompt, stages=self.stages)
                follow_cache(cache, state)
            finish_stats(st, self.method.take_notes())
            state.stats = st
            self.cur = None
            state.image_sources = state.image_out = None  # used up: never carried over to another prompt's features
        state.phase = "off"

    # ------------------------------------------------------------------ decoder layer pre-hooks
    def layer_pre(self, layer: int) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            state = self.state
            if state.phase == "prefill" and self.cur is not None:
                return self._prefill_layer(layer, module, args, kwargs)
            if state.phase == "decode" and state.plan is not None and state.plan.stages and \
                    layer >= state.plan.stages[0].layer:
                return self._decode_layer(layer, args, kwargs)
            return None
        return hook

    def _prefill_layer(self, layer: int, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        cur = self.cur
        h = args[0] if args else kwargs["hidden_states"]
        st = self.cur_stats
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
        record_layer(st, cur.real, cur.visual)
        if args:
            return (h, *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = h
        return args, kwargs

    # ------------------------------------------------------------------ attention rows
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
        xq = batched_index_select(x, q_idx)
        q = a.q_proj(xq).view(B, q_idx.shape[1], -1, hd)
        k = a.k_proj(x).view(B, L, -1, hd)
        if hasattr(a, "q_norm"):
            q, k = a.q_norm(q), a.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos, sin = pe
        cos, sin = cos.expand(B, -1, -1), sin.expand(B, -1, -1)
        rope = sys.modules[type(a).__module__].apply_rotary_pos_emb
        q, _ = rope(q, q, batched_index_select(cos, q_idx), batched_index_select(sin, q_idx))
        k, _ = rope(k, k, cos, sin)
        allowed = real[:, None, :] & (torch.arange(L, device=x.device)[None, None, :] <= q_idx[:, :, None])
        return attention_probs(q, k, a.scaling, allowed[:, None]).flatten(1, 2)  # (B, H, Q, L)

    # ------------------------------------------------------------------ a stage's reduction
    def _reduce(self, s: int, layer: int, h: Tensor, kwargs: dict) -> Tensor:
        cur = self.cur
        pe_now = cur.pe if cur.changed else kwargs.get("position_embeddings")
        view = StageView(stage=s, layer=layer, hidden=h, real=cur.real, visual=cur.visual, last=last_real(cur.real),
                         index=cur.index, lm_input=cur.lm_input, lm_visual=cur.lm_visual, lm_real=cur.lm_real,
                         attn=self._attn_fn(h, pe_now), n_visual0=cur.n_visual0)
        dec: StageDecision = self.method.reduce_stage(view)
        keep = cur.real & (~cur.visual | (dec.keep & cur.visual))
        B, L, _ = h.shape
        arange = torch.arange(L, device=h.device, dtype=torch.float64).expand(B, L)
        hs, valid, keys, idx, vis, pos = [h], [keep], [arange], [cur.index], [cur.visual], [cur.pos]
        if dec.extra is not None and dec.extra.shape[1] > 0:  # inserted after the last visual token
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
        order = packed_order(valid_, keys_, cur.pad_left)
        real2 = valid_.gather(1, order)
        h2 = batched_index_select(hs_, order)
        vis2 = vis_.gather(1, order) & real2
        idx2 = torch.where(real2, idx_.gather(1, order), -1)
        pos2 = pos_.gather(1, order)
        if self.method.positions == "compact":
            first = torch.where(real2, pos2, torch.iinfo(pos2.dtype).max).amin(1)
            first = torch.where(n > 0, first, torch.zeros_like(first))
            rank = real2.long().cumsum(1) - 1
            pos2 = torch.where(real2, first[:, None] + rank, torch.ones_like(pos2))
        shift = cur.lm_last_pos - pos2.gather(1, last_real(real2)[:, None])[:, 0]
        cur.index, cur.real, cur.visual, cur.pos = idx2, real2, vis2, pos2
        cur.pe = self.p.lm.rotary_emb(h2, pos2)
        sdpa_fast = self.attn_impl == "sdpa" and bool(real2.all())
        cur.mask4d = None if sdpa_fast else mask4d(causal_allowed(real2), h.dtype)
        cur.changed = True
        cur.inputs.clear()
        self.stages.append(StagePlan(layer, real2, shift, self.method.positions == "compact"))
        record_stage(self.cur_stats, layer, idx2, real2, vis2, pos2, cur.lm_visual)
        return h2

    # ------------------------------------------------------------------ decoding
    def _decode_layer(self, layer: int, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        plan = self.state.plan
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
                new_cols = am[:, plan.prompt.length:].bool()
                if new_cols.shape[1] != t + q:
                    raise ValueError(f"attention mask covers {new_cols.shape[1]} new tokens, the cache of layer {layer} "
                                     f"expects {t + q}")
            else:
                new_cols = torch.ones(B, t + q, dtype=torch.bool, device=h.device)
            full = torch.cat([stg.real, new_cols], 1)
            K = full.shape[1]
            qpos = stg.real.shape[1] + t + torch.arange(q, device=h.device)
            allowed = full[:, None, :] & (torch.arange(K, device=h.device)[None, None, :] <= qpos[None, :, None])
            mask = None if (q == 1 and bool(allowed.all())) else mask4d(allowed, h.dtype)
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
