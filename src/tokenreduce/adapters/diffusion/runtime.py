"""Per-forward bookkeeping shared by the merging and caching runtimes: the denoiser's input grid and
timestep (read by a forward pre-hook on the model), the step index in the scheduler's timesteps, the keep of
this forward, and the statistics reported by ``Handle.stats``."""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ...methods.diffusion.base import DiffusionMethod
from ..base import Stats
from .sites import Site, patch_size

__all__ = ["Clock", "DiffusionStats", "Timer"]


@dataclass
class DiffusionStats(Stats):
    """``Stats`` of the last denoiser forward, per site (``sites``, in execution order): ``site_tokens`` its
    spatial tokens N, ``tokens_attn`` the tokens its self-attention ran on (queries), ``tokens_kv`` its
    keys/values, ``tokens_mlp`` the tokens its feed-forward ran on (0 where the output came from a cache);
    ``timestep``/``step`` of the forward, ``full_step`` (caching methods). ``reduced``: the sites the method
    acted on (its levels, ``max_downsample``); ``keep_achieved``: the mean of their ``keep_per_site`` (what keep
    means at this integration point; 1.0 when no site was reduced); ``keep``: the requested fraction (None for
    a schedule). ``keep_run``: mean achieved keep over every forward since ``tr.apply``; ``forwards``: their
    number."""

    sites: list[str] = field(default_factory=list)
    site_tokens: list[int] = field(default_factory=list)
    tokens_kv: list[float] = field(default_factory=list)
    timestep: float | None = None
    step: int | None = None
    full_step: bool | None = None
    reduced: list[bool] = field(default_factory=list)
    caching: bool = False
    forwards: int = 0
    keep_run: float = 1.0

    @property
    def keep_per_site(self) -> list[float]:
        """Achieved keep of each site: the smallest of queries, keys/values and MLP tokens over N (caching
        methods: the MLP tokens recomputed over N; the attention output comes from the cache)."""
        if self.caching:
            return [m / n if n else 1.0 for m, n in zip(self.tokens_mlp, self.site_tokens, strict=True)]
        return [min(a, k, m) / n if n else 1.0 for a, k, m, n in
                zip(self.tokens_attn, self.tokens_kv, self.tokens_mlp, self.site_tokens, strict=True)]

    def achieved(self) -> float:
        """Mean ``keep_per_site`` over the reduced sites (1.0 if none was reduced)."""
        ks = [k for k, r in zip(self.keep_per_site, self.reduced, strict=True) if r]
        return sum(ks) / len(ks) if ks else 1.0

    @property
    def mean_keep(self) -> float:
        ks = self.keep_per_site
        return sum(ks) / len(ks) if ks else 1.0


class Clock:
    """Reads each denoiser forward's input size and timestep (forward pre-hook) and holds the current
    :class:`DiffusionStats`; ``needs_step``: the step index in ``method.scheduler.timesteps`` is required."""

    def __init__(self, model: nn.Module, method: DiffusionMethod, sites: list[Site], needs_step: bool) -> None:
        self.method, self.sites, self.needs_step = method, sites, needs_step
        self.patch = patch_size(model)
        self._sig = inspect.signature(type(model).forward)
        self.h0 = self.w0 = self.n0 = 0
        self.t, self.step, self.keep = 0.0, None, 1.0
        self.run, self.tick = 0, 0  # sampling run since install, and its step (a new timestep: next step)
        self._last_t: float | None = None
        self.stats = self._blank()
        self.last = self.stats
        self._keep_sum, self._forwards = 0.0, 0

    def _blank(self) -> DiffusionStats:
        n = len(self.sites)
        keep = self.method.keep
        return DiffusionStats(method=type(self.method).__name__, sites=[s.name for s in self.sites],
                              site_tokens=[0] * n, tokens_attn=[0.0] * n, tokens_kv=[0.0] * n, tokens_mlp=[0.0] * n,
                              reduced=[False] * n, caching=self.method.caches,
                              keep=keep if isinstance(keep, float) else None)

    # ------------------------------------------------------------------ hooks on the model
    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        bound = self._sig.bind_partial(module, *args, **kwargs).arguments
        x = bound.get("sample", bound.get("hidden_states"))
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"{type(module).__name__}: expected a (B, C, H, W) sample, got "
                             f"{None if x is None else tuple(x.shape)}")
        self.h0, self.w0 = x.shape[-2] // self.patch, x.shape[-1] // self.patch
        self.n0 = self.h0 * self.w0
        self.t, self.step = self._timestep(bound.get("timestep"))
        self._count_steps()
        self.keep = self.method.keep_at(self.t, self.step)
        self.stats = self._blank()
        self.stats.timestep, self.stats.step = self.t, self.step

    def _count_steps(self) -> None:
        """Sampling runs and their steps, from the timesteps alone (no scheduler needed): a forward at a new
        timestep is the run's next step; a timestep above the last one starts a new run (samplers go from
        high to low noise); forwards at the same timestep (split guidance halves, second-order solvers) share
        a step."""
        if self._last_t is None or self.t > self._last_t:
            self.run, self.tick = self.run + (self._last_t is not None), 0
        elif self.t != self._last_t:
            self.tick += 1
        self._last_t = self.t

    def post_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        st = self.stats
        self._forwards += 1
        st.keep_achieved = st.achieved()
        self._keep_sum += st.keep_achieved
        st.forwards, st.keep_run = self._forwards, self._keep_sum / self._forwards
        st.input_tokens = self.n0
        self.last = st

    def _timestep(self, ts: Any) -> tuple[float, int | None]:
        if ts is None:
            return 0.0, None
        if isinstance(ts, Tensor):
            flat = ts.detach().flatten()
            if flat.numel() > 1 and self.needs_step and not bool((flat == flat[0]).all()):
                raise ValueError(f"{type(self.method).__name__}: every sample of a batch must be at the same "
                                 f"timestep (got {flat.tolist()[:8]}...)")
            t = float(flat[0]) if flat.numel() else 0.0
        else:
            t = float(ts)
        return t, self._step_index(t)

    def _step_index(self, t: float) -> int | None:
        sched = self.method.scheduler
        if sched is None:
            return None
        timesteps = getattr(sched, "timesteps", None)
        if getattr(sched, "num_inference_steps", None) is None or timesteps is None:
            if not self.needs_step:
                return None
            raise ValueError(f"{type(self.method).__name__} needs a scheduler with fixed timesteps: "
                             f"{type(sched).__name__} has num_inference_steps=None; call "
                             f"scheduler.set_timesteps(num_steps) before sampling")
        hit = (torch.as_tensor(timesteps).float() == t).nonzero()
        if not len(hit):
            if not self.needs_step:
                return None
            raise ValueError(f"timestep {t} is not one of {type(sched).__name__}'s timesteps "
                             f"{torch.as_tensor(timesteps).tolist()[:6]}...: sample with the scheduler given to "
                             f"tr.apply (scheduler=)")
        return int(hit[0, 0])

    @property
    def steps(self) -> int:
        return len(self.method.scheduler.timesteps)


class Timer:
    """Adds the seconds spent inside ``with timer:`` to the current stats' ``reduce_seconds``."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._t0 = 0.0

    def __enter__(self) -> None:
        self._t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.clock.stats.reduce_seconds += time.perf_counter() - self._t0
