"""The vision attention a before-the-LLM method needs ([CLS] row, mean attention received, mean keys),
computed from forward hooks on the q/k projections of the few encoder layers it names."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ...core.ops import attention_probs
from ..base import Patcher

__all__ = ["VisionAttention"]


class VisionAttention:
    """Captures the q/k projections of vision layers and turns them into a method's context."""

    def __init__(self, layers: list[nn.Module], has_cls: bool) -> None:
        self.layers, self.has_cls = layers, has_cls
        self.captured: dict[int, dict[str, Tensor]] = {}

    def attach(self, patcher: Patcher, wanted: dict[int, frozenset[str]]) -> None:
        """Forward hooks on the q/k projections of the ``wanted`` vision layers."""
        for layer in wanted:
            if not 0 <= layer < len(self.layers):
                raise ValueError(f"vision layer {layer} out of range (tower has {len(self.layers)})")
            attn = self.layers[layer].self_attn
            patcher.hook(attn.q_proj.register_forward_hook(self._hook(layer, "q")))
            patcher.hook(attn.k_proj.register_forward_hook(self._hook(layer, "k")))

    def _hook(self, layer: int, kind: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: Tensor) -> None:
            self.captured.setdefault(layer, {})[kind] = out
        return hook

    def clear(self) -> None:
        self.captured.clear()

    def context(self, wanted: dict[int, frozenset[str]]) -> dict[str, dict[int, Tensor]]:
        """[CLS] attention row, mean attention received and mean keys of the ``wanted`` vision layers,
        restricted to the patches LLaVA feeds the projector."""
        ctx: dict[str, dict[int, Tensor]] = {"cls": {}, "mean": {}, "keys": {}}
        drop = 1 if self.has_cls else 0  # the projector input's [CLS] is gone or split off
        for layer, kinds in wanted.items():
            got = self.captured.get(layer)
            if got is None or "q" not in got or "k" not in got:
                raise RuntimeError(f"vision layer {layer}'s attention was not captured; pass pixel_values so the "
                                   f"vision tower runs with the method attached")
            attn = self.layers[layer].self_attn
            heads = getattr(attn, "num_heads", None) or attn.config.num_attention_heads
            q, k = got["q"], got["k"]
            B, N, _ = k.shape
            k4 = k.view(B, N, heads, -1).transpose(1, 2)
            q4 = q.view(B, N, heads, -1).transpose(1, 2)
            scale = getattr(attn, "scale", None) or getattr(attn, "scaling", None) or k4.shape[-1] ** -0.5
            every = torch.ones(1, 1, 1, N, dtype=torch.bool, device=k.device)  # bidirectional, no padding
            if "cls" in kinds:
                p = attention_probs(q4[:, :, :1], k4, scale, every).flatten(1, 2)  # (B, H, 1, N)
                ctx["cls"][layer] = p[:, :, 0, drop:].sum(1)
            if "mean" in kinds:
                p = attention_probs(q4, k4, scale, every).flatten(1, 2)  # (B, H, N, N)
                ctx["mean"][layer] = p.mean(1).mean(1)[:, drop:]
            if "keys" in kinds:
                ctx["keys"][layer] = k4.mean(1)[:, drop:]
        self.captured.clear()
        return ctx
