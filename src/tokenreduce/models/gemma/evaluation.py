"""Quick measurements of a causal LM: perplexity of a text, greedy continuation of a prompt, rank of a
continuation's first token (the conversion's self-check uses them; so do the benchmarks)."""

from __future__ import annotations

import math

__all__ = ["greedy_continuation", "next_token_rank", "perplexity"]


def perplexity(model, tokenizer, text: str, max_tokens: int = 512) -> float:
    """exp(mean next-token NLL) of ``text`` (with ``<bos>``), over its first ``max_tokens`` tokens."""
    import torch

    ids = tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens]
    if ids.shape[1] < 2:
        raise ValueError("need at least two tokens to measure perplexity")
    device = next(model.parameters()).device
    ids = ids.to(device)
    with torch.inference_mode():
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return float(math.exp(nll.item()))


def greedy_continuation(model, tokenizer, prompt: str, max_new_tokens: int = 8) -> str:
    """Greedy-decode ``max_new_tokens`` after ``prompt``; returns only the new text."""
    import torch

    enc = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
    with torch.inference_mode():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            top_p=None,
            top_k=None,
            temperature=None,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def next_token_rank(model, tokenizer, prompt: str, continuation: str) -> tuple[int, float]:
    """(1-based rank, probability) of the first token of ``continuation`` as the next token after ``prompt``."""
    import torch

    target = tokenizer(continuation, add_special_tokens=False).input_ids[0]
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    with torch.inference_mode():
        probs = model(input_ids=ids, use_cache=False).logits[0, -1].float().softmax(-1)
    return int((probs > probs[target]).sum().item()) + 1, float(probs[target].item())
