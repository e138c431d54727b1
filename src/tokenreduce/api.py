"""The public entry points: ``tr.apply`` and ``tr.methods``."""

from __future__ import annotations

from typing import Any

from torch import nn

from .adapters.base import Handle, find_adapter
from .core.budget import KeepLike
from .registry import get_method, methods

__all__ = ["apply", "methods"]


def apply(model: nn.Module, method: str, keep: KeepLike | None = None, **kwargs: Any) -> Handle:
    """Patch ``model`` in place with a registered token-reduction ``method`` and return a :class:`Handle`.

    ``keep``: fraction (float in (0, 1]) or count (int >= 1) of tokens that survive, per layer or stage as
    the method defines (see ``tr.methods()`` and the method's docstring); method knobs are keywords
    (e.g. ``r=`` for ToMe, ``layers=`` for stage methods, ``seed=`` for random ones).

    >>> with tr.apply(model, "tome", keep=0.5) as h:
    ...     logits = model(images)
    >>> h.stats.tokens_attn
    """
    adapter = find_adapter(model)
    spec = get_method(method, adapter.integration)
    impl = spec.build(keep=keep, **kwargs)
    return adapter.attach(model, impl, spec.name)
