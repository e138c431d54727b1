"""The question of a QA prompt, counted in tokens (what a kv-cache method's ``question_len`` keeps)."""

from __future__ import annotations

from typing import Any

__all__ = ["question_length"]


def question_length(tokenizer: Any, context: str, full_prompt: str) -> int:
    """Tokens of ``full_prompt`` after its ``context`` prefix (the part to keep uncompressed)."""
    n_full = len(tokenizer(full_prompt).input_ids)
    n_ctx = len(tokenizer(context).input_ids)
    if not full_prompt.startswith(context) or n_full < n_ctx:
        raise ValueError("full_prompt must start with context")
    return n_full - n_ctx
