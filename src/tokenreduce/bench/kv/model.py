"""The model every part runs on (Gemma 3 270M from the local cache), greedy generation and progress bars."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch

from .config import KVBenchConfig

__all__ = ["greedy", "load_model", "progress"]


def load_model(cfg: KVBenchConfig) -> tuple[Any, Any]:
    """Gemma 3 270M and its tokenizer in ``cfg.dtype`` (fp32 or bf16) with ``cfg.attn``; no end-of-sequence
    token, so every continuation has a fixed length."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ...models.gemma import gemma_cache_ready, load_gemma

    if not gemma_cache_ready():
        raise FileNotFoundError("the Gemma 3 270M checkpoint is not cached; build it with "
                                "`python scripts/convert_gemma.py` first")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.dtype]
    model, tok = load_gemma(dtype=dtype, attn_implementation=cfg.attn)
    model.generation_config.eos_token_id = None  # fixed-length continuations
    return model, tok


def greedy(model: Any, ids: torch.Tensor, n: int, **kw: Any) -> torch.Tensor:
    """``generate()`` of ``n`` greedy tokens after ``ids`` (prompt + continuation, like ``generate()``)."""
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, **kw)


def progress(desc: str, total: int | None = None, iterable: Iterable[Any] | None = None,
             mininterval: float = 0.1) -> Any:
    """A transient tqdm bar (``total`` steps, or over ``iterable``)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, mininterval=mininterval)
