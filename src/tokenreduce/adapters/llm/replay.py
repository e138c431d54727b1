"""Prefill capture and replay (benchmarks): :func:`capture_prefill` runs the unreduced prompt forward once and
keeps every layer's q/k/v; :func:`replay_prefill` rebuilds an applied method's prompt forward from it without
recomputing the model, so many kv-cache methods are evaluated on one prompt for the cost of one prefill."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..base import Handle
from .attention import ATTN_IMPLS, RUN_ATTR, wrapped_attention

__all__ = ["PrefillCapture", "capture_prefill", "replay_prefill"]


@dataclass
class PrefillCapture:
    """One unreduced prompt forward: per layer the (query, key, value) the attention received and its kwargs
    (scaling, softcap), plus the logits of the last prompt token. See :func:`replay_prefill`."""

    input_ids: Tensor
    attention_mask: Tensor
    layers: list[tuple[Tensor, Tensor, Tensor, dict[str, Any]]]
    last_logits: Tensor
    cache: Any = None  # the unreduced cache after the prompt (decoding from it appends, never writes in place)


def capture_prefill(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None) -> PrefillCapture:
    """Run the unreduced prompt forward once and keep every layer's q/k/v (an attention-interface wrapper that
    records and then calls the model's own attention). With :func:`replay_prefill` many kv-cache methods can be
    evaluated on one prompt for the cost of one prefill: eviction happens *after* each layer's attention, so a
    method's prompt forward computes exactly these tensors and logits (benchmarks; checked against the real
    path in tests/methods/test_kv.py)."""
    from transformers import DynamicCache
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import AttentionInterface

    base = model.base_model
    config = base.config
    impl = config._attn_implementation
    if impl not in ATTN_IMPLS:
        raise TypeError(f"attn_implementation={impl!r} is not supported; accepted: {', '.join(ATTN_IMPLS)}")
    layers_out: dict[int, tuple[Tensor, Tensor, Tensor, dict[str, Any]]] = {}

    def capture(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any, **kwargs: Any):
        layers_out[module.layer_idx] = (query, key, value, {k: kwargs.get(k) for k in ("scaling", "softcap")})
        return wrapped_attention(impl, module)(module, query, key, value, attention_mask, **kwargs)

    name = f"tokenreduce_capture_{impl}"
    AttentionInterface.register(name, capture)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[impl])
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    cache = DynamicCache(config=config)
    config._attn_implementation = name
    try:
        with torch.inference_mode():
            out = model(input_ids=input_ids, attention_mask=mask, past_key_values=cache, use_cache=True,
                        logits_to_keep=1)
    finally:
        config._attn_implementation = impl
    return PrefillCapture(input_ids, mask, [layers_out[i] for i in range(len(layers_out))], out.logits[:, -1], cache)


def replay_prefill(handle: Handle, capture: PrefillCapture) -> Any:
    """The prompt forward of an applied kv-cache method, rebuilt from a :class:`PrefillCapture` without
    recomputing the model: every layer's cache is filled with the captured keys/values and the method scores and
    evicts with the captured queries, exactly as the attention wrapper does after the layer's attention.
    Returns the (compressed) cache; ``handle.stats`` is set as after a real prefill; continue decoding with the
    model as usual (``capture.last_logits`` are the prompt's next-token logits)."""
    from transformers import DynamicCache

    model = handle.model
    base = model.base_model
    run = base.layers[0].self_attn.__dict__.get(RUN_ATTR)
    if run is None:
        raise TypeError("replay_prefill needs the handle of a kv-cache method applied to this model")
    if run.method.phase == "filter":
        raise TypeError(f"{run.name} changes the prompt forward itself (a prompt filter): it cannot be replayed "
                        f"from a captured unreduced prefill; run generate()")
    cache = DynamicCache(config=base.config)
    run.pre_forward(base, (), {"input_ids": capture.input_ids, "attention_mask": capture.attention_mask,
                                "past_key_values": cache, "use_cache": True})
    f = run.fwd
    assert f is not None and f.is_prefill
    method = run.method
    with torch.inference_mode():
        for li, (query, key, value, kw) in enumerate(capture.layers):
            module = base.layers[li].self_attn
            k_all, v_all = cache.update(key, value, li)
            if method.is_identity or not method.compresses(li, run.num_layers):
                continue
            if method.phase in ("decode", "prefill"):
                run.reduce(li, cache.layers[li], f, query, k_all, v_all, module, kw)
        run.post_forward(base, (), {}, None)
    return cache

