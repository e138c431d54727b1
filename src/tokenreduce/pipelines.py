"""Pipelines on top of :func:`tokenreduce.apply`: a whole QA prompt through a kv-cache method
(:func:`generate_with_question`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .adapters.llm import KVStats, question_length
from .api import apply

__all__ = ["generate_with_question"]


def generate_with_question(model: nn.Module, tokenizer: Any, context: str, question: str, method: str,
                           keep: Any, max_new_tokens: int = 32, **kw: Any) -> tuple[str, KVStats]:
    """QA-pipeline convenience: ``context + question`` as one prompt, the question kept uncompressed
    (``question_len`` counted from the tokenizer), greedy decoding. Returns (generated text, stats).

    >>> text, st = generate_with_question(model, tok, document, "\\nWhat is the pass key?\\n", "snapkv", 0.25,
    ...                                   window_size="question")
    """
    prompt = context + question
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    ql = question_length(tokenizer, context, prompt)
    with apply(model, method, keep=keep, question_len=ql, **kw) as h, torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False)
        stats = h.stats
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True), stats
