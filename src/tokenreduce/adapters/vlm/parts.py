"""Where the parts of a transformers LLaVA model are (:class:`LlavaParts`) and what a method may know of the
model (:func:`model_info`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ...methods.vlm import ModelInfo

__all__ = ["GRID_CLASSES", "LLAVA_CLASSES", "LlavaParts", "find_parts", "model_info"]

LLAVA_CLASSES = ("LlavaForConditionalGeneration", "LlavaModel", "LlavaNextForConditionalGeneration",
                 "LlavaNextModel", "LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel")
#: the classes whose images are one patch grid each (LLaVA-1.5 style; the others pack anyres crops)
GRID_CLASSES = ("LlavaForConditionalGeneration", "LlavaModel")


@dataclass
class LlavaParts:
    llava: nn.Module  # LlavaModel
    lm: nn.Module  # the decoder (LlamaModel, Qwen2Model, ...)
    layers: list[nn.Module]
    vision_layers: list[nn.Module]
    projector: nn.Module
    config: Any


def find_parts(model: nn.Module) -> LlavaParts:
    """The LlavaModel, its decoder and decoder layers, the vision encoder layers and the projector of ``model``."""
    llava = model.model if type(model).__name__.endswith("ForConditionalGeneration") else model
    lm = llava.language_model
    if not hasattr(lm, "layers") or not hasattr(lm, "rotary_emb"):
        raise TypeError(f"{type(model).__name__}'s language model {type(lm).__name__} is not a RoPE decoder with "
                        f"`layers`/`rotary_emb` (Llama, Mistral, Qwen2 ...): unsupported")
    vt = llava.vision_tower
    enc = getattr(getattr(vt, "vision_model", vt), "encoder", None)
    vlayers = list(enc.layers) if enc is not None and hasattr(enc, "layers") else []
    return LlavaParts(llava, lm, list(lm.layers), vlayers, llava.multi_modal_projector, llava.config)


def model_info(model: nn.Module, parts: LlavaParts) -> ModelInfo:
    """Depths, the vision layer LLaVA takes its features from, the patch grid and tokens per image."""
    cfg = parts.config
    vcfg = cfg.vision_config
    depth = len(parts.layers)
    vdepth = len(parts.vision_layers)
    fl = cfg.vision_feature_layer
    if not isinstance(fl, int):
        raise NotImplementedError(f"vision_feature_layer={fl!r}: multi-layer features are not supported")
    # hidden_states[fl] is the output of encoder layer fl-1 (fl >= 1) / vdepth + fl (fl < 0)
    feature_layer = fl - 1 if fl > 0 else vdepth + fl
    has_cls = hasattr(getattr(getattr(parts.llava.vision_tower, "vision_model", parts.llava.vision_tower),
                              "embeddings", None), "class_embedding")
    grid = None
    per = 0
    if type(model).__name__ in GRID_CLASSES:
        size, patch = vcfg.image_size, vcfg.patch_size
        grid = (size // patch, size // patch)
        per = grid[0] * grid[1] + (1 if cfg.vision_feature_select_strategy == "full" and has_cls else 0)
    return ModelInfo(depth=depth, vision_depth=vdepth, feature_layer=feature_layer, grid=grid, has_cls=has_cls,
                     tokens_per_image=per)
