"""Pipelines on top of :func:`tokenreduce.apply`: the question of a QA prompt counted in tokens
(:func:`question_length`, what a kv-cache method's ``question_len`` keeps) and a whole QA prompt through a
kv-cache method (:func:`generate_with_question`). Public as ``tr.question_length`` / ``tr.generate_with_question``;
the LLM adapter is imported when a pipeline runs, so ``import tokenreduce`` stays light."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .api import apply

if TYPE_CHECKING:
    from .adapters.llm import KVStats

__all__ = ["generate_with_question", "question_length"]


def question_length(tokenizer: Any, context: str, full_prompt: str) -> int:
    """Tokens of ``full_prompt`` after its ``context`` prefix (the part to keep uncompressed): the
    ``question_len`` of a kv-cache method for the prompt ``full_prompt = context + question``.

    >>> with tr.apply(llm, "snapkv", keep=0.25, question_len=tr.question_length(tok, doc, doc + q)): ...
    """
    n_full = len(tokenizer(full_prompt).input_ids)
    n_ctx = len(tokenizer(context).input_ids)
    if not full_prompt.startswith(context) or n_full < n_ctx:
        raise ValueError("full_prompt must start with context")
    return n_full - n_ctx


def generate_with_question(model: nn.Module, tokenizer: Any, context: str, question: str, method: str,
                           keep: Any, max_new_tokens: int = 32, **kw: Any) -> tuple[str, KVStats]:
    """QA-pipeline convenience: ``context + question`` as one prompt, the question kept uncompressed
    (``question_len`` counted by :func:`question_length`), greedy decoding; ``kw``: the method's knobs or
    ``preset=``. Returns (generated text, stats).

    >>> text, st = tr.generate_with_question(model, tok, document, "\\nWhat is the pass key?\\n", "snapkv", 0.25,
    ...                                      preset="question-max9")
    """
    prompt = context + question
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    ql = question_length(tokenizer, context, prompt)
    with apply(model, method, keep=keep, question_len=ql, **kw) as h, torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False)
        stats = h.stats
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True), stats
