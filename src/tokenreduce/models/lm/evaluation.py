"""Evaluating a causal LM: the mean negative log-likelihood of held-out windows (perplexity) and the
log-probability of a continuation given a prefix (for multiple-choice probes)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ...core.loss import token_cross_entropy

__all__ = ["continuation_logprobs", "perplexity", "window_nll"]


@torch.no_grad()
def window_nll(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """``(n,)``: the mean NLL (nats per token) of each window's ``seq_len - 1`` predicted tokens."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, windows.shape[0], batch_size):
        x = windows[i : i + batch_size]
        losses, _ = token_cross_entropy(model(input_ids=x).logits, x)
        out.append(losses.mean(dim=1))
    model.train(was_training)
    return torch.cat(out)


def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 64) -> float:
    """``exp`` of the mean NLL over all predicted tokens of ``windows`` (every window has as many)."""
    return math.exp(window_nll(model, windows, batch_size).mean().item())


@torch.no_grad()
def continuation_logprobs(model: torch.nn.Module, tokenizer: Any, prefixes: Sequence[str],
                          continuations: Sequence[str], batch_size: int = 64) -> list[float]:
    """``log P(continuation | prefix)`` (the sum over the continuation's tokens) for each pair; the prefix starts
    with the end-of-text token as a document would. Sequences are right-padded (causal: padding after the
    continuation changes nothing)."""
    if len(prefixes) != len(continuations):
        raise ValueError(f"{len(prefixes)} prefixes and {len(continuations)} continuations: give one each")
    eot = tokenizer.eos_token_id
    seqs = []
    for p, c in zip(prefixes, continuations):
        a = [eot] + tokenizer(p).input_ids
        b = tokenizer(c).input_ids
        if not b:
            raise ValueError(f"continuation {c!r} has no tokens")
        seqs.append((a, b))
    was_training = model.training
    model.eval()
    out: list[float] = []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i : i + batch_size]
        width = max(len(a) + len(b) for a, b in chunk)
        ids = torch.full((len(chunk), width), eot, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        for j, (a, b) in enumerate(chunk):
            ids[j, : len(a) + len(b)] = torch.tensor(a + b)
            labels[j, len(a) : len(a) + len(b)] = torch.tensor(b)
        losses, valid = token_cross_entropy(model(input_ids=ids).logits, labels)
        out += (-(losses * valid).sum(dim=1)).tolist()
    model.train(was_training)
    return out
