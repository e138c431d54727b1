"""The character tokenizer of the reasoning LM, a real ``transformers`` fast tokenizer (so the prompt methods of
this project, which need character offsets, run on it unchanged) and the text layout of its sequences.

Vocabulary: ``<pad> <bos> <eos> <unk>``, the characters of the arithmetic task (:mod:`tokenreduce.data.chains`)
and one control token per compression ratio, ``<g40>`` for gamma 0.4 (TokenSkip, Xia et al. 2025, Sec. 3.2: the
ratio is written in the prompt). A sequence::

    <bos> 7+3*2-5 ? [<g60>] 7+3=0;0*2=0;0-5=5; # 5 <eos>
          question    gamma  chain (compressible)  answer

The prompt ends after ``?`` (and the gamma token); the model writes the chain, ``#``, the answer digit and
``<eos>``. The ``no-chain`` model writes ``#`` right after the prompt.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

__all__ = ["ANSWER_MARK", "CHARS", "GAMMAS", "PROMPT_END", "SPECIAL", "build_tokenizer", "completion_text",
           "gamma_token", "parse_completion", "prompt_text"]

SPECIAL = ("<pad>", "<bos>", "<eos>", "<unk>")
CHARS = "0123456789+-*=;?#"
PROMPT_END = "?"
ANSWER_MARK = "#"
#: the ratios that have a control token (0.1 steps); a ratio outside them is refused
GAMMAS = tuple(round(0.1 * i, 1) for i in range(1, 11))


def gamma_token(gamma: float) -> str:
    """``<g60>`` for 0.6; a ValueError naming the accepted ratios for any other value."""
    g = round(float(gamma), 1)
    if abs(g - float(gamma)) > 1e-9 or g not in GAMMAS:
        raise ValueError(f"gamma={gamma!r} has no control token; accepted: {', '.join(f'{x:g}' for x in GAMMAS)}")
    return f"<g{round(g * 100):02d}>"


def vocabulary() -> list[str]:
    return [*SPECIAL, *CHARS, *(gamma_token(g) for g in GAMMAS)]


@lru_cache(maxsize=1)
def build_tokenizer() -> Any:
    """The ``PreTrainedTokenizerFast`` (one token per character, a control token per gamma; decoding joins
    tokens without spaces). Built from code, so it needs no file; cached."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(vocabulary())}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"<[a-z]+\d*>|."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.padding_side = "left"  # batched greedy decoding continues every row at its last position
    return tok


def prompt_text(question: str, gamma: float | None = None) -> str:
    """The prompt (without ``<bos>``): the question, ``?`` and the gamma token of TokenSkip (None: none)."""
    return question + PROMPT_END + ("" if gamma is None else gamma_token(gamma))


def completion_text(chain: str, answer: str) -> str:
    """What the model writes after the prompt (without ``<eos>``)."""
    return f"{chain}{ANSWER_MARK}{answer}"


def parse_completion(text: str) -> tuple[str, str | None]:
    """``(chain, answer)`` of a generated completion: the answer is the character after the first ``#``
    (None when there is no ``#`` or nothing after it)."""
    chain, mark, rest = text.partition(ANSWER_MARK)
    return chain, (rest[0] if mark and rest else None)
