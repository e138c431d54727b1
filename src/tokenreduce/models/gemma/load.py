"""Loading the converted Gemma checkpoint from the cache."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .cache import gemma_cache_dir, gemma_cache_ready, missing_cache_message
from .convert import convert_gemma

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["load_gemma"]


def load_gemma(
    dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
    convert_if_missing: bool = False,
    path: Path | None = None,
):
    """``(model, tokenizer)`` from the cached checkpoint; the model is in eval mode.

    ``dtype`` defaults to ``torch.float32`` (with SDPA the fast path on CPU). If the cache is
    missing, raises ``FileNotFoundError`` with the command that builds it, unless
    ``convert_if_missing`` (then it converts first, which takes minutes).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path) if path is not None else gemma_cache_dir()
    if not gemma_cache_ready(path):
        if not convert_if_missing:
            raise FileNotFoundError(missing_cache_message(path))
        convert_gemma(path)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=torch.float32 if dtype is None else dtype,
        attn_implementation=attn_implementation,
        local_files_only=True,
    )
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer
