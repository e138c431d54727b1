"""The LM's tokenizer: a byte-level BPE (GPT-2's pre-tokenisation, no unknown tokens) trained here with the
``tokenizers`` package on the training split, saved as ``tokenizer.json`` beside the weights and loaded as a
``transformers.PreTrainedTokenizerFast``. One special token, ``<|endoftext|>`` (id 0), separates documents
and serves as BOS, EOS and padding."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["EOT", "load_tokenizer", "same_tokenizer", "train_tokenizer"]

EOT = "<|endoftext|>"


def _wrap(tok: Any) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, pad_token=EOT)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    """A byte-level BPE of ``vocab_size`` entries (the 256 bytes, :data:`EOT` and the merges) trained on ``texts``
    (deterministic for the same texts)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return _wrap(tok)


def load_tokenizer(path: Path) -> Any:
    """The tokenizer saved at ``path`` (a ``tokenizer.json``)."""
    from tokenizers import Tokenizer

    return _wrap(Tokenizer.from_file(str(path)))


def same_tokenizer(a: Any, b: Any) -> bool:
    """Whether two tokenizers map every string to the same ids (same vocabulary and merges)."""
    return a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
