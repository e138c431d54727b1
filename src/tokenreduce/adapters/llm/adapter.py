"""The adapter for HF decoder-only LLMs (integration point ``kv-cache``): matches the model families of
:data:`FAMILIES`, and attaches a method (the run object on every attention module, the ``tokenreduce_<impl>``
attention interface, the forward hooks of the base model, and for a prompt filter a wrapped ``generate``);
registered with the adapters when imported."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ...methods.kv import KVMethod
from ..base import Handle, Patcher, register_adapter
from .attention import ATTN_IMPLS, RUN_ATTR, register_interfaces, wrapped_attention
from .filter import filtered_generate
from .run import KVRun
from .stats import KVStats

__all__ = ["FAMILIES", "LLMAdapter", "model_family"]

FAMILIES = {
    "llama": ("LlamaForCausalLM", "LlamaModel"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Model"),
    "mistral": ("MistralForCausalLM", "MistralModel"),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextModel"),
}


def model_family(model: nn.Module) -> str | None:
    """The key of :data:`FAMILIES` ``model`` belongs to (by class name and transformers module), or None."""
    for cls in type(model).__mro__:
        for fam, names in FAMILIES.items():
            if cls.__name__ in names and cls.__module__.startswith(f"transformers.models.{fam}."):
                return fam
    return None


class _Restore:
    def __init__(self, fn: Callable[[], None]) -> None:
        self.remove = fn


class LLMAdapter:
    """Adapter for HF decoder-only LLMs (integration point ``kv-cache``)."""

    integration = "kv-cache"
    name = "transformers decoder LLMs (Llama, Qwen2, Mistral, Gemma 3 text: *ForCausalLM / *Model)"

    def matches(self, model: nn.Module) -> bool:
        return model_family(model) is not None

    def attach(self, model: nn.Module, method: Any, method_name: str) -> Handle:
        if not isinstance(method, KVMethod):
            raise TypeError(f"{method_name} is not a kv-cache method")
        base = model.base_model
        layers = getattr(base, "layers", None)
        if layers is None or not len(layers):
            raise TypeError(f"{type(model).__name__}: no decoder layers found at {type(base).__name__}.layers")
        p = Patcher()
        runs: list[KVRun] = []
        # the handle first: a model that already has a method applied is refused before anything is touched
        handle = Handle(model, method_name, method, p, lambda: runs[0].stats() if runs else KVStats(method_name))
        try:
            runs.append(self._patch(model, base, layers, method, method_name, p))
        except BaseException:
            handle.remove()
            raise
        return handle

    def _patch(self, model: nn.Module, base: nn.Module, layers: Any, method: KVMethod, method_name: str,
               p: Patcher) -> KVRun:
        config = base.config
        impl = config._attn_implementation
        if impl.startswith("tokenreduce_"):  # applied to the causal LM and now to its base model (or back)
            other = layers[0].self_attn.__dict__.get(RUN_ATTR)
            raise RuntimeError(f"{type(model).__name__} already has tokenreduce method "
                               f"{getattr(other, 'name', '?')!r} applied (to the model sharing its decoder layers); "
                               f"call .remove() on its handle first")
        if impl not in ATTN_IMPLS:
            raise TypeError(f"attn_implementation={impl!r} is not supported by tokenreduce kv-cache methods; "
                            f"accepted: {', '.join(ATTN_IMPLS)} (load the model with attn_implementation='sdpa')")
        register_interfaces()
        attn_modules = [layer.self_attn for layer in layers]
        inner = wrapped_attention(impl, attn_modules[0])
        run = KVRun(model, base, method, method_name, impl, inner, attn_modules)
        for m in attn_modules:
            p.set_attr(m, RUN_ATTR, run)
        old_impl = impl

        def restore() -> None:
            config._attn_implementation = old_impl

        config._attn_implementation = f"tokenreduce_{impl}"
        p.hook(_Restore(restore))
        p.hook(base.register_forward_pre_hook(run.pre_forward, with_kwargs=True))
        p.hook(base.register_forward_hook(run.post_forward, with_kwargs=True))
        if method.phase == "filter":
            if not hasattr(model, "generate"):
                raise TypeError(f"{method_name} filters the prompt of generate(): {type(model).__name__} has none "
                                f"(apply it to the *ForCausalLM model)")
            p.set_method(model, "generate", filtered_generate(run.prompt_filter, run.name, model.generate))
        return run


register_adapter(LLMAdapter())
