"""The LM's corpus and batches: the cleaned Wikipedia articles of gensim's test data
(:mod:`tokenreduce.data.wiki`), split by whole article, as token ids.

Splits (:data:`SPLITS`, fractions of the characters): ``train`` (the base LM's pre-training text, plus the 300
Lee news documents of :mod:`tokenreduce.data.text`), ``clean`` (a high-quality set kept apart, e.g. for a
reference model), ``stream`` (kept apart for continued training), ``test`` (held-out perplexity, never trained
on). Documents are joined with the end-of-text token.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import cache
from typing import Any

import torch

__all__ = ["DATA_VERSION", "SPLITS", "Batch", "corpus_splits", "encode_documents", "eval_windows",
           "random_window_batches"]

#: bump when the splits or the encoding change
DATA_VERSION = 1
SPLITS = {"train": 0.55, "clean": 0.15, "stream": 0.2, "test": 0.1}
#: a training batch: ``input_ids`` and ``labels`` (B, T) in the Hugging Face convention (labels aligned with the
#: inputs, -100 ignored), and any extra per-token tensors a loss may use (e.g. a ``junk`` mask)
Batch = dict[str, torch.Tensor]


@cache
def corpus_splits() -> dict[str, tuple[str, ...]]:
    """The documents (one string each, paragraphs joined by newlines) of every split of :data:`SPLITS`."""
    from tokenreduce.data.text import lee_documents
    from tokenreduce.data.wiki import split_articles, wiki_articles

    parts = split_articles(wiki_articles(), SPLITS)
    out = {name: tuple(a.text for a in arts) for name, arts in parts.items()}
    out["train"] = out["train"] + tuple(lee_documents())
    return out


def encode_documents(tokenizer: Any, docs: Sequence[str]) -> torch.Tensor:
    """One 1-D id tensor: every document's ids followed by the end-of-text token."""
    eot = tokenizer.eos_token_id
    ids: list[int] = []
    for d in tokenizer(list(docs)).input_ids if docs else []:
        ids += d + [eot]
    return torch.tensor(ids, dtype=torch.long)


def random_window_batches(ids: torch.Tensor, batch_size: int, seq_len: int, seed: int,
                          extra: dict[str, torch.Tensor] | None = None) -> Iterator[Batch]:
    """Endless batches of ``batch_size`` windows of ``seq_len`` tokens at uniformly random offsets of ``ids``
    (a generator seeded with ``seed``); ``extra`` per-token tensors aligned with ``ids`` are cut alike."""
    if ids.numel() < seq_len + 1:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    gen = torch.Generator().manual_seed(seed)
    span = torch.arange(seq_len)
    while True:
        starts = torch.randint(0, ids.numel() - seq_len + 1, (batch_size,), generator=gen)
        idx = starts[:, None] + span
        x = ids[idx]
        yield {"input_ids": x, "labels": x.clone(), **{k: v[idx] for k, v in (extra or {}).items()}}


def eval_windows(ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping ``(n, seq_len)`` windows of ``ids`` (the tail shorter than a window dropped),
    at most ``max_windows`` of them, evenly spaced over the text."""
    n = ids.numel() // seq_len
    if n == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    windows = ids[: n * seq_len].view(n, seq_len)
    if max_windows is not None and max_windows < n:
        windows = windows[torch.linspace(0, n - 1, max_windows).round().long()]
    return windows
