"""Diffusion adapter: token reduction inside diffusers denoisers (integration point ``diffusion``).

    with tr.apply(pipe.unet, "tomesd", keep=0.5):        # ToMe for SD's one-liner
        images = sample(...)

Supported: diffusers ``UNet2DConditionModel`` (Stable Diffusion's transformer blocks), ``UNet2DModel`` (its
attention blocks), ``DiTTransformer2DModel`` and ``Transformer2DModel`` (DiT blocks); see :mod:`.sites`.
Everything goes through forward hooks and instance attributes (:mod:`.merging`, :mod:`.caching`): no block
forward is copied, and ``Handle.remove()`` (also on an exception inside ``with``) restores the model exactly.
``keep=1.0`` installs nothing. ``Handle.stats`` is a :class:`~.runtime.DiffusionStats` of the last forward.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ...methods import diffusion as _methods  # noqa: F401  (registers the diffusion methods)
from ...methods.diffusion.base import DIFFUSION, DiffusionMethod
from ..base import Handle, Patcher, register_adapter
from .caching import CacheRuntime
from .merging import MergeRuntime
from .runtime import Clock, DiffusionStats
from .sites import SUPPORTED, find_sites, is_diffusers

__all__ = ["DiffusionAdapter", "DiffusionStats"]


class DiffusionAdapter:
    """Adapter for diffusers denoisers (integration point ``diffusion``). It claims every diffusers model so
    that an unsupported one gets an error naming the supported classes."""

    name = f"diffusers denoisers ({', '.join(SUPPORTED)})"
    integration = DIFFUSION

    def matches(self, model: nn.Module) -> bool:
        return is_diffusers(model)

    def attach(self, model: nn.Module, method: Any, method_name: str) -> Handle:
        if not isinstance(method, DiffusionMethod):
            raise TypeError(f"{method_name}: {type(method).__name__} is not a diffusion method")
        sites = find_sites(model)
        needs_step = method.caches or isinstance(method.keep, tuple)
        if method.caches and method.scheduler is not None and not hasattr(method.scheduler, "set_timesteps"):
            raise TypeError(f"{method_name}: scheduler= must be a diffusers scheduler with fixed timesteps "
                            f"(set_timesteps), got {type(method.scheduler).__name__}")
        clock = Clock(model, method, sites, needs_step)
        p = Patcher()
        if not method.is_identity:
            p.hook(model.register_forward_pre_hook(clock.pre_hook, with_kwargs=True))
            if method.caches:
                CacheRuntime(method, sites, clock).install(p, model)
            else:
                MergeRuntime(method, sites, clock).install(p)
            p.hook(model.register_forward_hook(clock.post_hook))

        def stats() -> DiffusionStats:
            st = clock.last
            st.method = method_name
            return st

        return Handle(model, method_name, method, p, stats)


register_adapter(DiffusionAdapter())
