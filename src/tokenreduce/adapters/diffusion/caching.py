"""Caching runtime (ToCa): full steps compute everything and fill per-block caches; the steps between reuse
the cached self-attention output and recompute the feed-forward for the selected tokens only.

The block's own forward runs unchanged; the self-attention and feed-forward modules get an instance
``forward`` that calls their class's forward (on all tokens, or the selected ones) or returns the cache, and
at full steps hooks on ``to_q``/``to_k`` capture the projections for the attention-received score.
Caches are kept per call of a step (a classifier-free-guidance run that calls the model twice per step,
conditional and unconditional, gets two caches).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ...core.diffusion import attention_received, grid_shape
from ...core.state import batched_index_select
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
    received: Tensor | None = None  # (B, N) attention received at the last full step


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
        self._qk: dict[str, Tensor] = {}
        self._grids: list[tuple[int, int] | None] = [None] * len(sites)

    def install(self, p: Patcher, model: nn.Module) -> None:
        p.hook(model.register_forward_pre_hook(self._begin, with_kwargs=True))
        for i, s in enumerate(self.sites):
            p.set_method(s.attn, "forward", self._attn_forward(i))
            p.set_method(s.ff, "forward", self._ff_forward(i))
            p.hook(s.attn.to_q.register_forward_hook(self._capture("q")))
            p.hook(s.attn.to_k.register_forward_hook(self._capture("k")))

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

    def _capture(self, key: str) -> Any:
        def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
            if self._capturing:
                self._qk[key] = out

        return hook

    _capturing = False

    def _attn_forward(self, i: int) -> Any:
        site = self.sites[i]

        def forward(attn: nn.Module, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            stats, cache = self.clock.stats, self._slot[i]
            n = hidden_states.shape[1]
            grid = self._reduces(i, n)
            stats.site_tokens[i] = n
            stats.tokens_attn[i] = stats.tokens_kv[i] = float(n)
            if grid is None or self.full or cache.attn is None:
                self._capturing = grid is not None and self.method.uses_attention
                try:
                    out = type(attn).forward(attn, hidden_states, *args, **kwargs)
                finally:
                    self._capturing = False
                if grid is not None:
                    cache.attn = out
                    if self.method.uses_attention:
                        with self.timer:
                            q, k = self._qk.pop("q"), self._qk.pop("k")
                            cache.received = attention_received(q, k, attn.heads, attn.scale)
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
                idx = self.method.select(cache.received, cache.stale, grid, k)
            stats.tokens_mlp[i] = float(k)
            if idx is None:  # the zero-overhead reference: the first k tokens, no scores, no gathers
                cache.mlp[:, :k] = type(ff).forward(ff, x[:, :k], *args, **kwargs)
                return cache.mlp
            with self.timer:
                sel = batched_index_select(x, idx)
            out = type(ff).forward(ff, sel, *args, **kwargs)
            with self.timer:
                flat = (idx + torch.arange(B, device=idx.device).unsqueeze(1) * n).reshape(-1)
                cache.mlp.view(B * n, C).index_copy_(0, flat, out.reshape(-1, C).to(cache.mlp.dtype))
                cache.stale.add_(1).scatter_(1, idx, 0)
            return cache.mlp

        return forward
