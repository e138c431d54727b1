"""Caching runtime (ToCa): full steps compute everything and fill per-block caches; the steps between reuse
the cached self-attention output and recompute the feed-forward for the selected tokens only.

The block's own forward runs unchanged; the self-attention and feed-forward modules get an instance
``forward`` that calls their class's forward (on all tokens, or the selected ones) or returns the cache. At
full steps the self-attention of a caching block runs with diffusers' explicit ``AttnProcessor`` (softmax(q k^T)
then v: the same attention as SDPA) and an instance ``get_attention_scores`` reads the attention each token
receives from the probabilities it already computed (ToCa's reference takes its score from the attention map of
the full step the same way), instead of computing the N x N map a second time.
Caches are kept per call of a step (a classifier-free-guidance run that calls the model twice per step,
conditional and unconditional, gets two caches).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ...core.diffusion import grid_shape
from ...methods.diffusion.toca import ToCa
from ..base import Patcher
from .runtime import Clock, Timer
from .sites import Site

__all__ = ["CacheRuntime"]


@dataclass
class _Cache:
    attn: Tensor | None = None
    mlp: Tensor | None = None
    stale: Tensor | None = None  # (B, N) steps since each token's MLP output was computed
    influence: Tensor | None = None  # (B, N) ToCa's s1 from the attention received at the last full step


class CacheRuntime:
    def __init__(self, method: ToCa, sites: list[Site], clock: Clock) -> None:
        bad = [s.name for s in sites if s.ff is None]
        if bad:
            raise TypeError(f"toca caches a transformer block's attention and feed-forward outputs; {bad[0]} is a plain "
                            f"attention block without one (use a merging method on this model)")
        self.method, self.sites, self.clock = method, sites, clock
        self.timer = Timer(clock)
        self.caches: dict[int, list[_Cache]] = {}
        self._last_step: int | None = None
        self._call = 0
        self._influence: Tensor | None = None
        self._explicit: Any = None
        self._grids: list[tuple[int, int] | None] = [None] * len(sites)

    def install(self, p: Patcher, model: nn.Module) -> None:
        p.hook(model.register_forward_pre_hook(self._begin, with_kwargs=True))
        for i, s in enumerate(self.sites):
            p.set_method(s.attn, "forward", self._attn_forward(i))
            p.set_method(s.ff, "forward", self._ff_forward(i))
            if self.method.uses_attention:
                p.set_method(s.attn, "get_attention_scores", self._scores)

    def _begin(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """After the clock's pre-hook: is this a full step, and which call of the step is it."""
        step = self.clock.step
        if step is None:
            raise ValueError("toca needs the step index of every forward: pass scheduler= with fixed timesteps")
        self._call = self._call + 1 if step == self._last_step else 0
        self._last_step = step
        self.full = self.clock.keep >= 1.0 or self.method.full_step(step)
        if step == 0 and self._call == 0:
            self.caches.clear()
        self.clock.stats.full_step = self.full
        self._slot = self.caches.setdefault(self._call, [_Cache() for _ in self.sites])

    def _reduces(self, i: int, n: int) -> tuple[int, int] | None:
        """The (h, w) grid of site i if caching applies at its level, else None."""
        c = self.clock
        d, h, w = grid_shape(n, c.n0, c.h0, c.w0)
        return (h, w) if d <= self.method.max_downsample and h * w == n else None

    def _scores(self, attn: nn.Module, query: Tensor, key: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The class's ``get_attention_scores`` (probabilities (B * heads, N, N), diffusers' head-major batch);
        while capturing, also the attention each token receives, summed over queries and averaged over heads."""
        probs = type(attn).get_attention_scores(attn, query, key, attention_mask)
        if self._capturing:
            with self.timer:
                received = probs.view(-1, attn.heads, probs.shape[-2], probs.shape[-1]).float().sum(-2).mean(1)
                self._influence = self.method.influence(received)
        return probs

    _capturing = False

    def _full_attention(self, attn: nn.Module, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """The class's forward with diffusers' explicit ``AttnProcessor`` (its probabilities give the score),
        the attention's own processor restored after."""
        if self._explicit is None:
            from diffusers.models.attention_processor import AttnProcessor

            self._explicit = AttnProcessor()
        own, attn.processor = attn.processor, self._explicit
        self._capturing = True
        try:
            return type(attn).forward(attn, hidden_states, *args, **kwargs)
        finally:
            attn.processor, self._capturing = own, False

    def _attn_forward(self, i: int) -> Any:
        site = self.sites[i]

        def forward(attn: nn.Module, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            stats, cache = self.clock.stats, self._slot[i]
            n = hidden_states.shape[1]
            grid = self._reduces(i, n)
            stats.site_tokens[i] = n
            stats.tokens_attn[i] = stats.tokens_kv[i] = float(n)
            if grid is None or self.full or cache.attn is None:
                if grid is not None and self.method.uses_attention:
                    self._influence = None
                    out = self._full_attention(attn, hidden_states, *args, **kwargs)
                    cache.influence, self._influence = self._influence, None
                else:
                    out = type(attn).forward(attn, hidden_states, *args, **kwargs)
                if grid is not None:
                    cache.attn = out
                return out
            if cache.attn.shape != (hidden_states.shape[0], n, cache.attn.shape[-1]):
                raise RuntimeError(f"{site.name}: cached attention output {tuple(cache.attn.shape)} does not match "
                                   f"this call's {tuple(hidden_states.shape)}: keep the batch of every step the same")
            stats.tokens_attn[i] = stats.tokens_kv[i] = 0.0
            return cache.attn

        return forward

    def _ff_forward(self, i: int) -> Any:
        def forward(ff: nn.Module, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            stats, cache = self.clock.stats, self._slot[i]
            B, n, C = x.shape
            grid = self._reduces(i, n)
            stats.tokens_mlp[i] = float(n)
            stats.reduced[i] = grid is not None and self.clock.keep < 1.0
            if grid is None or self.full or cache.mlp is None or cache.mlp.shape[0] != B:
                out = type(ff).forward(ff, x, *args, **kwargs)
                if grid is not None:
                    cache.mlp, cache.stale = out, torch.zeros(B, n, dtype=torch.long, device=x.device)
                return out
            c = self.clock
            k = self.method.fresh_count(c.keep, n, i, len(self.sites), c.step, c.steps)
            with self.timer:
                idx = self.method.select(cache.influence, cache.stale, grid, k)
            stats.tokens_mlp[i] = float(k)
            if idx is None:  # the zero-overhead reference: the first k tokens, no scores, no gathers
                cache.mlp[:, :k] = type(ff).forward(ff, x[:, :k], *args, **kwargs)
                return cache.mlp
            with self.timer:  # one flat index for the gather and the write-back
                flat = (idx + torch.arange(B, device=idx.device).unsqueeze(1) * n).view(-1)
                sel = x.reshape(B * n, C).index_select(0, flat).view(B, k, C)
            out = type(ff).forward(ff, sel, *args, **kwargs)
            with self.timer:
                co = cache.mlp.shape[-1]
                cache.mlp.view(B * n, co).index_copy_(0, flat, out.reshape(B * k, co).to(cache.mlp.dtype))
                cache.stale.add_(1).scatter_(1, idx, 0)
            return cache.mlp

        return forward
