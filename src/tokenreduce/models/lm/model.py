"""The small LM's network: a Hugging Face ``LlamaForCausalLM`` built from an :class:`~.config.LMConfig`."""

from __future__ import annotations

from typing import Any

from .config import LMConfig

__all__ = ["build_lm"]


def build_lm(config: LMConfig | None = None, **overrides: Any) -> Any:
    """An untrained ``LlamaForCausalLM`` of ``config`` (SDPA attention, fp32); ``overrides`` replace
    ``LlamaConfig`` fields, e.g. ``build_lm(LMConfig(), vocab_size=300)``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = config or LMConfig()
    return LlamaForCausalLM(LlamaConfig(**{**config.model_kwargs(), **overrides}, attn_implementation="sdpa"))
