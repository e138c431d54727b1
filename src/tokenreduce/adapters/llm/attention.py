"""The attention-interface functions: the model's ``attn_implementation`` (``sdpa`` or ``eager``) is wrapped
by a registered ``tokenreduce_<impl>`` function that hands the call to the run object of the module's model
(stored on the attention module under :data:`RUN_ATTR`), or behaves like the wrapped implementation for a
module no handle owns."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

__all__ = ["ATTN_IMPLS", "RUN_ATTR", "family_eager", "register_interfaces", "wrapped_attention"]

ATTN_IMPLS = ("sdpa", "eager")
RUN_ATTR = "_tokenreduce_kv"  # attribute of an attention module holding the run of the handle that owns it


def family_eager(module: nn.Module) -> Callable[..., Any]:
    """The ``eager_attention_forward`` of the model family of ``module``."""
    mod = sys.modules.get(type(module).__module__)
    fn = getattr(mod, "eager_attention_forward", None)
    if fn is None:
        raise TypeError(f"{type(module).__name__}: no eager_attention_forward in {type(module).__module__}")
    return fn


def wrapped_attention(impl: str, module: nn.Module) -> Callable[..., Any]:
    """The model's own attention function for ``impl`` (one of :data:`ATTN_IMPLS`)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return family_eager(module) if impl == "eager" else ALL_ATTENTION_FUNCTIONS["sdpa"]


def _make_attention(impl: str) -> Callable[..., Any]:
    def attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any,
                  **kwargs: Any) -> Any:
        run = module.__dict__.get(RUN_ATTR)
        if run is None:  # a module of a model this handle does not own: behave like the wrapped implementation
            return wrapped_attention(impl, module)(module, query, key, value, attention_mask, **kwargs)
        return run.attention(module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"tokenreduce_{impl}_attention"
    return attention


_REGISTERED = False


def register_interfaces() -> None:
    """Register ``tokenreduce_sdpa`` / ``tokenreduce_eager`` with transformers (once)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    for impl in ATTN_IMPLS:
        AttentionInterface.register(f"tokenreduce_{impl}", _make_attention(impl))
        ALL_MASK_ATTENTION_FUNCTIONS.register(f"tokenreduce_{impl}", ALL_MASK_ATTENTION_FUNCTIONS[impl])
    assert "tokenreduce_sdpa" in ALL_ATTENTION_FUNCTIONS
    _REGISTERED = True
