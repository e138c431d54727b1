"""Passcode retrieval prompts (the "pass key" test of Mohtashami & Jaggi 2023, used by StreamingLLM/SnapKV
evaluations) built from real English filler (Lee news corpus), so compression cannot exploit repetition.

A sample is ``context`` (filler with "The pass key is NNNNN. Remember it. NNNNN is the pass key." inserted at
a relative ``depth``), ``question`` ("Now answer the quiz. What is the pass key?") and ``answer_prefix``
("The pass key is"); ``answer`` is the 5-digit code. Keep the question uncompressed (context/question split).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from .text import lee_documents

__all__ = ["ANSWER_PREFIX", "QUESTION", "PasscodeSample", "make_passcode_samples"]

QUESTION = "Now answer the quiz. What is the pass key?"
ANSWER_PREFIX = "The pass key is"


@dataclass(frozen=True)
class PasscodeSample:
    context: str
    question: str
    answer_prefix: str
    answer: str
    depth: float
    target_tokens: int

    @property
    def prompt(self) -> str:
        """Full prompt as one string: context, question, answer prefix."""
        return f"{self.context}\n{self.question}\n{self.answer_prefix}"

    def correct(self, generated: str) -> bool:
        """The answer counts if the 5 digits appear in the generated continuation."""
        return self.answer in generated


def _sentences(seed: int) -> list[str]:
    rng = random.Random(seed)
    docs = list(lee_documents())
    rng.shuffle(docs)
    out: list[str] = []
    for d in docs:
        out.extend(s.strip() + "." for s in d.split(". ") if len(s.strip()) > 20)
    return out


def make_passcode_samples(
    n: int,
    target_tokens: int,
    count_tokens: Callable[[str], int],
    depths: list[float] | None = None,
    seed: int = 0,
) -> list[PasscodeSample]:
    """``n`` samples whose context has about ``target_tokens`` tokens (by ``count_tokens``, e.g. the LM's
    tokenizer), the passcode at depths cycling through ``depths`` (default 0.1..0.9)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if target_tokens < 50:
        raise ValueError(f"target_tokens must be >= 50 (room for filler), got {target_tokens}")
    depths = depths or [0.1, 0.3, 0.5, 0.7, 0.9]
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"depth {d} out of range [0, 1]")
    rng = random.Random(seed)
    samples = []
    for i in range(n):
        sents = _sentences(seed * 1000 + i)
        # grow filler until it reaches the token target (estimate by characters, then correct)
        filler: list[str] = []
        j = 0
        while count_tokens(" ".join(filler)) < target_tokens - 30 and j < len(sents):
            filler.extend(sents[j: j + 8])
            j += 8
        while len(filler) > 1 and count_tokens(" ".join(filler)) > target_tokens - 30:
            filler.pop()
        code = f"{rng.randint(10000, 99999)}"
        depth = depths[i % len(depths)]
        needle = f"The pass key is {code}. Remember it. {code} is the pass key."
        k = round(depth * len(filler))
        context = " ".join(filler[:k] + [needle] + filler[k:])
        samples.append(PasscodeSample(context, QUESTION, ANSWER_PREFIX, code, depth, target_tokens))
    return samples
