"""The VLM adapter (:class:`VlmAdapter`): checks the model and method, and attaches the hooks of the
before-the-LLM path (:mod:`.before_llm`, :mod:`.vision`) and of the inside-the-LLM path
(:mod:`.inside_llm`) around one shared :class:`~.state.RunState`."""

from __future__ import annotations

from typing import Any

from torch import nn

from ...methods.vlm import VlmMethod
from ..base import Handle, Patcher, register_adapter
from .before_llm import BeforeLlm
from .inside_llm import InsideLlm
from .parts import LLAVA_CLASSES, find_parts, model_info
from .state import RunState
from .vision import VisionAttention

__all__ = ["VlmAdapter"]


class VlmAdapter:
    """Adapter for transformers' LLaVA family (integration point ``vlm-visual``)."""

    name = "transformers LLaVA VLMs (LlavaForConditionalGeneration; LLaVA-NeXT/OneVision for inside-LLM methods)"
    integration = "vlm-visual"

    def matches(self, model: nn.Module) -> bool:
        return type(model).__name__ in LLAVA_CLASSES and hasattr(model, "config") and \
            hasattr(model.config, "image_token_id")

    def attach(self, model: nn.Module, method: Any, method_name: str) -> Handle:
        if not isinstance(method, VlmMethod):
            raise TypeError(f"{method_name} is not a VLM method")
        parts = find_parts(model)
        impl = parts.lm.config._attn_implementation
        if impl not in ("sdpa", "eager"):
            raise ValueError(f"attention implementation {impl!r} is not supported by the VLM adapter; "
                             f"accepted: 'sdpa', 'eager'")
        info = model_info(model, parts)
        if method.where is not None and info.grid is None:
            raise ValueError(f"{method_name} reduces tokens before the LLM, which needs one patch grid per image "
                             f"(LLaVA-1.5 style); {type(model).__name__} packs anyres crops. Use an inside-LLM "
                             f"method (fastv, sparsevlm, pdrop)")
        method.setup(info)
        method.check_budget()
        state = RunState(name=method_name)
        vision = VisionAttention(parts.vision_layers, info.has_cls)
        before = BeforeLlm(state, method, parts, info, vision)
        inside = InsideLlm(state, method, parts, info)
        p = Patcher()
        try:
            if method.where is not None:
                vision.attach(p, method.vision_layers())
                p.set_method(parts.projector, "forward", before.projector_forward(parts.projector.forward))
            if parts.llava is not model:
                p.hook(model.register_forward_pre_hook(before.top_pre, with_kwargs=True))
            p.hook(parts.llava.register_forward_pre_hook(before.llava_pre, with_kwargs=True))
            p.hook(parts.lm.register_forward_pre_hook(inside.lm_pre, with_kwargs=True))
            p.hook(parts.lm.register_forward_hook(inside.lm_post, with_kwargs=True))
            for i, layer in enumerate(parts.layers):
                p.hook(layer.register_forward_pre_hook(inside.layer_pre(i), with_kwargs=True))
        except Exception:
            p.undo()
            raise
        return Handle(model, method_name, method, p, lambda: state.stats)


register_adapter(VlmAdapter())
