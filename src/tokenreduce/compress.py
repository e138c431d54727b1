"""Prompt compression, the text-in/text-out integration point: ``tr.compress(text, method=..., keep=...)``.

The same four parts as every method (Kong et al. 2025): a **criterion** scores units of the prompt (LM
self-information, question-conditioned perplexity, encoder relevance), a **strategy** keeps or drops
units, the **budget** is a number of tokens *of the target LM*, and the integration point is the text
itself. The methods and what they see (:class:`~tokenreduce.methods.prompt.base.Prompt`) are in
:mod:`tokenreduce.methods.prompt`; the models behind the criteria in the adapters layer (the causal-LM
scorer :class:`~tokenreduce.adapters.prompt.scorer.CausalScorer`, the sentence encoder
:func:`~tokenreduce.adapters.minilm.embed_sentences`). This module holds :func:`compress`: validation, the
exact-budget loop and :class:`CompressionResult`.

Budget: the target is ``round(keep * n)`` tokens of the LM's tokenizer (n = tokens of the text). Methods
pick pieces summing to exactly the target; the kept text is then re-tokenized (joining pieces can merge
or split tokens at the seams) and the selection is redone with a corrected target until the re-tokenized
count matches (a few cheap re-selections, no new LM pass). ``kept_ratio`` is measured on the output text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .adapters.minilm import embed_sentences
from .adapters.prompt.scorer import get_scorer
from .core.budget import Keep, as_method_keep, validate_keep_value
from .methods.prompt.base import Prompt

__all__ = ["RATIO_TOLERANCE", "CompressionResult", "compress"]

RATIO_TOLERANCE = 0.03  # relative: |kept_ratio - keep| <= 3% of keep (or one token for tiny targets)


# ---------------------------------------------------------------------------- result
@dataclass
class CompressionResult:
    """What :func:`compress` returns.

    ``text``: the compressed prompt; ``kept_ratio``: its tokens / the input's tokens (the LM's tokenizer,
    measured by re-tokenizing ``text``); ``keep``: the requested keep; ``spans``: the (start, end) character
    ranges of the input that were kept, in output order (methods that reorder, e.g. ``longllmlingua``, give
    them in their new order); ``timings``: seconds for ``tokenize``, ``score`` (LM/encoder passes),
    ``select`` and ``total``.
    """

    text: str
    kept_ratio: float
    keep: float | int
    method: str
    n_tokens: int
    n_kept: int
    target_tokens: int
    spans: list[tuple[int, int]]
    timings: dict[str, float]
    question: str | None = None
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return self.text

    @property
    def within_tolerance(self) -> bool:
        return abs(self.n_kept - self.target_tokens) <= max(1.0, RATIO_TOLERANCE * self.target_tokens)


# ---------------------------------------------------------------------------- entry point
def _resolve_tokenizer(lm: Any, tokenizer: Any) -> Any:
    if tokenizer is None:
        raise ValueError(
            "compress needs the LM's tokenizer to count tokens and map them back to text: pass tokenizer= "
            "(a transformers *fast* tokenizer, e.g. AutoTokenizer.from_pretrained(...))"
            + ("" if lm is None else f"; got lm={type(lm).__name__} without one")
        )
    if not callable(tokenizer) or not hasattr(tokenizer, "convert_ids_to_tokens"):
        raise TypeError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}")
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"{type(tokenizer).__name__} is a slow tokenizer: compress needs character offsets, which only fast "
            "tokenizers give (AutoTokenizer.from_pretrained(..., use_fast=True))"
        )
    return tokenizer


def _target_tokens(keep: float, n: int) -> int:
    """Target LM tokens: ``round(keep n)`` (at least 1) for a fraction, the count of ``Keep(count=...)``."""
    validate_keep_value(keep)
    if isinstance(keep, float):
        return max(1, round(keep * n))
    if keep > n:
        raise ValueError(f"Keep(count={keep}) tokens is larger than the text: it has {n} tokens (accepted: 1..{n}, "
                         f"or a fraction)")
    return int(keep)


def compress(
    text: str,
    method: str = "selective-context",
    keep: float = 0.5,
    lm: nn.Module | None = None,
    tokenizer: Any = None,
    question: str | None = None,
    **kwargs: Any,
) -> CompressionResult:
    """Compress ``text`` to ``keep`` of its tokens (in the LM's tokenizer) with a registered prompt method.

    ``keep``: a float in (0, 1], the fraction of the text's LM tokens kept, or ``tr.Keep(count=n)`` tokens
    (a plain int is refused: ``keep=1`` was ambiguous). ``lm``: a transformers causal LM used as the
    scorer (methods that need one); ``tokenizer``: its *fast* tokenizer (always needed: the budget is in its
    tokens). ``question``: for question-aware methods (``longllmlingua``, ``extractive``); the question itself
    is not part of ``text`` and not compressed. Method knobs are keywords (see ``tr.methods("prompt")``),
    scorer knobs ``max_window``, ``overlap``, ``batch_tokens``, ``head_dtype``, ``head_mode``, ``anchor_stride``,
    ``anchor_topk``, ``body_dtype``, ``attention`` (see
    :class:`~tokenreduce.adapters.prompt.scorer.CausalScorer`).

    Same input and settings -> same output. ``keep=1.0`` returns ``text`` unchanged without running a model.

    >>> res = tr.compress(context, method="longllmlingua", keep=0.5, lm=model, tokenizer=tok, question=q)
    >>> res.text, res.kept_ratio, res.spans
    """
    t_start = time.perf_counter()
    from .registry import get_method

    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if question is not None and not isinstance(question, str):
        raise TypeError(f"question must be a str or None, got {type(question).__name__}")
    if not text.strip():
        if question is not None and question.strip():
            raise ValueError("a question without a context: text is empty, there is nothing to compress "
                             "(pass the context as text= and the question as question=)")
        raise ValueError("text is empty (or only whitespace): there is nothing to compress")
    if question is not None and not question.strip():
        raise ValueError("question is empty: pass question=None for question-agnostic compression")
    keep = as_method_keep(keep)  # a fraction, or the count of Keep(count=n); a plain int is refused
    if isinstance(keep, Keep):
        raise TypeError(f"compress takes one budget for the whole prompt (a float fraction or tr.Keep(count=n)), "
                        f"got {keep!r}")
    spec = get_method(method, "prompt")
    scorer_kw = {k: kwargs.pop(k) for k in ("max_window", "overlap", "batch_tokens", "head_dtype", "head_mode",
                                                        "anchor_stride", "anchor_topk", "body_dtype", "attention") if k in kwargs}
    impl = spec.build(**kwargs)
    if impl.needs_question and question is None:
        raise ValueError(f"method {method!r} is question-aware: pass question=<the question the prompt must answer>")
    if lm is not None and not isinstance(lm, nn.Module):
        raise TypeError(f"lm must be a causal LM (a transformers *ForCausalLM torch module), got {type(lm).__name__}")
    tokenizer = _resolve_tokenizer(lm, tokenizer)
    if impl.needs_lm and lm is None:
        raise ValueError(f"method {method!r} scores tokens with a causal LM: pass lm= (e.g. Gemma 3 270M) "
                         f"and its tokenizer=")
    scorer = get_scorer(lm, tokenizer, **scorer_kw) if (lm is not None and impl.needs_lm) else None

    t0 = time.perf_counter()
    prompt = Prompt(text, tokenizer, question, scorer, embedder=embed_sentences if impl.needs_encoder else None)
    n = prompt.n
    target = _target_tokens(keep, n)
    prompt.target = target
    timings = {"tokenize": time.perf_counter() - t0}
    notes: list[str] = []

    if target >= n:  # identity: the text, unchanged
        timings.update(score=0.0, select=0.0, total=time.perf_counter() - t_start)
        return CompressionResult(text, 1.0, keep, spec.name, n, n, n, [(0, len(text))], timings, question, notes)

    t0 = time.perf_counter()
    prep = impl.prepare(prompt, target)
    timings["score"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    best: tuple[int, str, list[int]] | None = None
    goal = target
    tried: set[int] = set()
    for _ in range(8):
        tried.add(goal)
        order = [int(i) for i in impl.select(prompt, prep, goal)]
        out = prompt.pieces.join(order)
        c = prompt.count(out)
        if best is None or abs(c - target) < abs(best[0] - target):
            best = (c, out, order)
        if c == target:
            break
        nxt = min(n, max(1, goal + (target - c)))
        if nxt in tried:
            step = 1 if c < target else -1
            nxt = min(n, max(1, goal + step))
            if nxt in tried:
                break
        goal = nxt
    assert best is not None
    c, out, order = best
    timings["select"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    if scorer is not None:
        notes.extend(scorer.notes)
    res = CompressionResult(out, c / n, keep, spec.name, n, c, target, prompt.pieces.spans(order), timings,
                            question, notes)
    if not res.within_tolerance:
        res.notes.append(f"achieved {c} tokens for a target of {target}: the text's pieces could not be joined "
                         f"into exactly the target count (outside the {RATIO_TOLERANCE:.0%} tolerance)")
    return res

