"""The run object of one applied kv-cache method: the forward hooks on the base model and the attention call of
every layer, handed to the modules that do the work (cache bookkeeping :mod:`.state`, masks :mod:`.masks`,
eviction :mod:`.eviction`, per-query selection :mod:`.selection`, the prompt filter :mod:`.filter`, stats
:mod:`.stats`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from ...core.state import check_finite
from ...methods.kv import KVMethod
from .eviction import reduce_layer
from .filter import PromptFilter
from .masks import layer_mask
from .selection import select_entries
from .state import Forward, begin_forward
from .stats import KVStats, collect_stats

__all__ = ["KVRun"]


class KVRun:
    """What one handle does to its model (see the package docstring): ``pre_forward`` / ``post_forward`` are
    the forward (pre-)hooks of the base model, ``attention`` the call of every attention layer."""

    def __init__(self, model: nn.Module, base: nn.Module, method: KVMethod, name: str, impl: str,
                 inner: Callable[..., Any], attn_modules: list[nn.Module]) -> None:
        self.model, self.base, self.method, self.name = model, base, method, name
        self.impl, self.inner = impl, inner
        self.config = base.config
        self.num_layers = len(attn_modules)
        self.layer_types = list(getattr(self.config, "layer_types", None) or ["full_attention"] * self.num_layers)
        self.fwd: Forward | None = None
        self._stats = KVStats(method=name, keep=method.keep_fraction)
        self.prompt_filter = PromptFilter(method, base, inner, self.num_layers, self.layer_types)

    # ------------------------------------------------------------------ hooks on the base model
    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        from transformers.cache_utils import DynamicCache

        if self.prompt_filter.active is not None:  # the filter pass is a plain forward of the first layers
            return args, kwargs

        ids = kwargs.get("input_ids", args[0] if args else None)
        emb = kwargs.get("inputs_embeds")
        ref = ids if ids is not None else emb
        if ref is None:
            raise ValueError("tokenreduce kv-cache: the model got neither input_ids nor inputs_embeds")
        if emb is not None:
            check_finite(emb, "inputs_embeds")  # as the other adapters: reductions would spread NaN/Inf silently
        B, q_len = int(ref.shape[0]), int(ref.shape[1])
        cache = kwargs.get("past_key_values")
        use_cache = kwargs.get("use_cache")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cache is None and use_cache:
            cache = DynamicCache(config=self.config)
            kwargs["past_key_values"] = cache
        if cache is None:
            self.fwd = None
            return args, kwargs
        self.fwd = begin_forward(cache, kwargs.get("attention_mask"), q_len, B, ref.device, self.method.question_len)
        return args, kwargs

    def post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        f = self.fwd
        if f is None or self.prompt_filter.active is not None:
            return output
        self._stats = collect_stats(f, self.method, self.name, self.config, self.layer_types,
                                    self.prompt_filter.record)
        self.fwd = None
        return output

    def stats(self) -> KVStats:
        return self._stats

    # ------------------------------------------------------------------ attention wrapper
    def attention(self, module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any,
                  **kwargs: Any) -> Any:
        if self.prompt_filter.active is not None:
            return self.prompt_filter.attention(module, query, key, value, attention_mask, **kwargs)
        f = self.fwd
        if f is None:
            return self.inner(module, query, key, value, attention_mask, **kwargs)
        li = module.layer_idx
        layer = f.cache.layers[li]
        if layer.compact:
            attention_mask = layer_mask(layer, f, query, key.shape[2], module.layer_idx, self.impl)
        method = self.method
        if method.is_identity or not method.compresses(li, self.num_layers):
            return self.inner(module, query, key, value, attention_mask, **kwargs)
        if method.phase == "select" and not f.is_prefill:
            t0 = time.perf_counter()
            key, value, attention_mask = select_entries(method, self.num_layers, self.impl, li, layer, f, query, key,
                                                        value, attention_mask, module, kwargs)
            f.reduce_seconds += time.perf_counter() - t0
        out = self.inner(module, query, key, value, attention_mask, **kwargs)
        if method.phase == "prefill" and not f.is_prefill and f.q_len > 1:
            f.notes.append(f"{method.name} compresses the prompt once: this {f.q_len}-token forward on a non-empty "
                           f"cache was appended uncompressed (chunked prefill is supported by decoding methods)")
        if method.phase == "decode" or (method.phase == "prefill" and f.is_prefill):
            self.reduce(li, layer, f, query, key, value, module, kwargs)
        return out

    def reduce(self, li: int, layer: Any, f: Forward, query: Tensor, key: Tensor, value: Tensor, module: nn.Module,
               kwargs: dict) -> None:
        """Evict from layer ``li`` after its attention (:func:`~.eviction.reduce_layer`), timed."""
        t0 = time.perf_counter()
        reduce_layer(self.method, self.num_layers, li, layer, f, query, key, value, module, kwargs)
        f.reduce_seconds += time.perf_counter() - t0
