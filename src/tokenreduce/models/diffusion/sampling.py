"""Sampling the class-conditional denoisers: DDIM (Song et al. 2021, eta = 0: deterministic) with
classifier-free guidance (Ho & Salimans 2022): eps = eps(x, null) + g (eps(x, y) - eps(x, null)), the
conditional and unconditional halves in one batch, as diffusers' pipelines do.

Every sample's initial noise comes from its own generator (``seed``, sample index), so sample i is the same
image whatever batch it is drawn in, and two runs (reduced and unreduced) start from the same noise.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .denoisers import ClassConditional, DenoiserConfig

__all__ = ["ddim_scheduler", "initial_noise", "sample"]


def ddim_scheduler(config: DenoiserConfig, steps: int) -> object:
    """A diffusers ``DDIMScheduler`` with the training noise schedule of ``config``, set to ``steps`` steps
    ("trailing" spacing, so the first step starts at the last training timestep)."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=config.train_timesteps, beta_schedule=config.beta_schedule,
                          clip_sample=True, timestep_spacing="trailing")
    sched.set_timesteps(steps)
    return sched


def initial_noise(n: int, seed: int, start: int = 0, size: int = 32, dtype: torch.dtype = torch.float32) -> Tensor:
    """(n, 1, size, size) standard normal noise; sample ``start + i`` from generator ``seed * 1_000_003 + i``."""
    out = torch.empty(n, 1, size, size)
    for i in range(n):
        g = torch.Generator().manual_seed(seed * 1_000_003 + start + i)
        out[i] = torch.randn(1, size, size, generator=g)
    return out.to(dtype)


@torch.inference_mode()
def sample(model: ClassConditional, labels: Tensor, *, steps: int = 20, guidance: float = 2.0, seed: int = 0,
           batch_size: int = 64, scheduler: object | None = None, start: int = 0,
           dtype: torch.dtype = torch.float32) -> Tensor:
    """Images (n, 1, 32, 32) in [-1, 1] for class ``labels`` (n,), DDIM ``steps`` with guidance ``guidance``
    (1.0 = no guidance: one forward per step; otherwise the two halves batched). ``scheduler``: a DDIM
    scheduler to use (e.g. the one a caching method was given); set to ``steps`` here."""
    sched = scheduler if scheduler is not None else ddim_scheduler(model.config, steps)
    sched.set_timesteps(steps)
    out = []
    for i in range(0, labels.shape[0], batch_size):
        y = labels[i: i + batch_size]
        x = initial_noise(y.shape[0], seed, start + i, dtype=dtype)
        null = torch.full_like(y, model.null_label)
        for t in sched.timesteps:
            tt = torch.full((y.shape[0],), int(t), dtype=torch.long)
            if guidance == 1.0:
                eps = model(x, tt, y)
            else:
                e_c, e_u = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, null])).chunk(2)
                eps = e_u + guidance * (e_c - e_u)
            x = sched.step(eps, t, x).prev_sample
        out.append(x.float().clamp(-1, 1))
    return torch.cat(out)
