"""A small decoder LM trained here, on CPU, on real English (the Wikipedia articles of gensim's test data).

A Hugging Face ``LlamaForCausalLM`` of 2.6 M parameters with its own byte-level BPE tokenizer (4,096 entries),
trained from scratch in about 10 minutes on one CPU thread: ``tokenreduce train lm`` (cached in
``~/.cache/tokenreduce/small_lm/v<version>-<hash>``; measured numbers in ``docs/experiments/lm.md``).

Typical use::

    from tokenreduce.models.lm import load_small_lm
    model, tokenizer, info = load_small_lm(train_if_missing=True)

The training loop is generic (:func:`train_causal_lm`: any causal LM, batches of token ids, a pluggable loss
such as :func:`tokenreduce.rho1_loss`), shared by the studies that continue training a model.

Modules: :mod:`~.config` (:class:`LMConfig`, :class:`OptimConfig`, checkpoint address), :mod:`~.data` (corpus
splits, batches), :mod:`~.tokenizer` (BPE), :mod:`~.model`, :mod:`~.train` (the loop, training and loading),
:mod:`~.evaluation` (perplexity, continuation log-probabilities), :mod:`~.cli` (``tokenreduce train lm``).
"""

from __future__ import annotations

from .config import MODEL_VERSION, LMConfig, OptimConfig, checkpoint_dir
from .data import SPLITS, Batch, corpus_splits, encode_documents, eval_windows, random_window_batches
from .evaluation import continuation_logprobs, perplexity, window_nll
from .model import build_lm
from .tokenizer import load_tokenizer, same_tokenizer, train_tokenizer
from .train import (
    LossFn,
    TrainLog,
    causal_lm_loss,
    load_small_lm,
    train_causal_lm,
    train_or_load_metrics,
    train_small_lm,
)

__all__ = [
    "MODEL_VERSION",
    "SPLITS",
    "Batch",
    "LMConfig",
    "LossFn",
    "OptimConfig",
    "TrainLog",
    "build_lm",
    "causal_lm_loss",
    "checkpoint_dir",
    "continuation_logprobs",
    "corpus_splits",
    "encode_documents",
    "eval_windows",
    "load_small_lm",
    "load_tokenizer",
    "perplexity",
    "random_window_batches",
    "same_tokenizer",
    "train_causal_lm",
    "train_or_load_metrics",
    "train_small_lm",
    "train_tokenizer",
    "window_nll",
]
