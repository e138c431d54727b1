"""The public entry points: ``tr.apply`` and ``tr.methods``."""

from __future__ import annotations

from typing import Any

from torch import nn

from .adapters.base import Handle, find_adapter
from .core.budget import KeepLike
from .registry import get_method, methods

__all__ = ["apply", "methods"]


def apply(model: nn.Module, method: str, keep: KeepLike | None = None, *, preset: str | None = None,
          **kwargs: Any) -> Handle:
    """Patch ``model`` in place with a registered token-reduction ``method`` and return a :class:`Handle`.

    ``keep`` (required): a float fraction in (0, 1] whose meaning is fixed per integration point, so that two
    methods at the same keep are comparable (``tr.methods()["keep"]``; e.g. on ViT layers the fraction of the
    token-block work kept); ``1.0`` is the unreduced model. ``tr.Keep(count=n)`` gives a token count, a
    ``tr.Keep([...])`` a per-stage schedule in the method's own terms. ``preset``: named settings of the method
    (``tokenreduce list NAME``), which may set keep. Method knobs are keywords (``r=`` for ToMe, ``layers=`` for
    stage methods, ``seed=`` for random ones). The achieved value is ``h.stats.keep_achieved``.

    >>> with tr.apply(model, "tome", keep=0.5) as h:
    ...     logits = model(images)
    >>> h.stats.keep_achieved, h.stats.tokens_attn
    """
    adapter = find_adapter(model)
    spec = get_method(method, adapter.integration)
    impl = spec.build(keep=keep, preset=preset, **kwargs)
    return adapter.attach(model, impl, spec.name)
