"""Configuration of the small decoder LM trained here and the address of its cached checkpoint:
``cache_dir("small_lm", "v<MODEL_VERSION>-<config hash>")`` (:func:`checkpoint_dir`; the hash covers the
corpus version too, so a change of the text cleaning never loads stale weights)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from tokenreduce._paths import cache_dir
from tokenreduce.data.wiki import WIKI_VERSION

from ...core.errors import check_int
from ..checkpoint import JsonFields, StoredConfig, short_hash

__all__ = ["MODEL_VERSION", "LMConfig", "OptimConfig", "checkpoint_dir"]

#: Bump when the training code changes in a way that changes the weights.
MODEL_VERSION = 1


@dataclass(frozen=True)
class OptimConfig(StoredConfig):
    """AdamW with linear warm-up over ``warmup_fraction`` of the steps, cosine decay to ``lr * min_lr_ratio``,
    weight decay on matrices only, gradient clipping at ``grad_clip`` (global norm)."""

    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_fraction: float = 0.05
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        ranges = {"lr": (0.0, 1.0, False), "grad_clip": (0.0, math.inf, False), "weight_decay": (0.0, 10.0, True),
                  "warmup_fraction": (0.0, 1.0, True), "min_lr_ratio": (0.0, 1.0, True)}
        for name, (lo, hi, closed) in ranges.items():
            v = getattr(self, name)
            if not ((lo <= v) if closed else (lo < v)) or not v <= hi:
                raise ValueError(f"{name}={v!r} is out of range: must be in {'[' if closed else '('}{lo}, {hi}]")


@dataclass(frozen=True)
class LMConfig(StoredConfig):
    """The small LM: a Hugging Face ``LlamaForCausalLM`` (RMSNorm, RoPE, SwiGLU, tied embeddings) with a
    byte-level BPE tokenizer of ``vocab_size`` trained here on the training split, trained from scratch on
    random ``seq_len``-token windows of that split (:mod:`~tokenreduce.models.lm.data`) for ``steps`` x
    ``batch_size`` windows. Defaults: 2.6 M parameters (192 wide, 4 layers, 3 heads of 64), 1,000 steps of 16 x
    128 tokens: about 10 minutes on one CPU thread (``docs/experiments/lm.md``). ``num_threads``,
    ``eval_every`` and ``eval_batch_size`` only change speed or logging (left out of the hash)."""

    vocab_size: int = 4096
    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = 3
    intermediate_size: int = 512
    seq_len: int = 128
    steps: int = 1000
    batch_size: int = 16
    optim: OptimConfig = field(default_factory=OptimConfig)
    seed: int = 0
    num_threads: int = 1
    eval_every: int = 200
    eval_batch_size: int = 64

    _HASH_EXCLUDED: ClassVar[frozenset[str]] = frozenset({"num_threads", "eval_every", "eval_batch_size"})
    _JSON_FIELDS: ClassVar[JsonFields] = {"optim": (dict, OptimConfig.from_dict)}

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "steps", "batch_size",
                     "num_threads", "eval_batch_size"):
            check_int(name, getattr(self, name))
        check_int("vocab_size", self.vocab_size, 260, "the 256 bytes, the special token and some merges")
        check_int("seq_len", self.seq_len, 2, "a causal LM predicts token t+1 from 1..t")
        check_int("eval_every", self.eval_every, 0, "0: no evaluation while training")
        check_int("seed", self.seed, 0)
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"num_heads={self.num_heads} must divide hidden_size={self.hidden_size} into an even "
                             f"head size (RoPE rotates pairs)")

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``transformers.LlamaConfig`` (vocabulary size of the trained tokenizer)."""
        return {"vocab_size": self.vocab_size, "hidden_size": self.hidden_size, "num_hidden_layers": self.num_layers,
                "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_heads,
                "intermediate_size": self.intermediate_size, "max_position_embeddings": self.seq_len,
                "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}

    def config_hash(self) -> str:
        """Short stable hash of everything that determines the trained weights (and the corpus version)."""
        from .data import DATA_VERSION

        payload = self.hash_payload()
        payload["_versions"] = {"model": MODEL_VERSION, "wiki": WIKI_VERSION, "data": DATA_VERSION}
        return short_hash(payload, compact=True)


def checkpoint_dir(config: LMConfig | None = None) -> Path:
    """Cache directory of the checkpoint of ``config`` (created if missing)."""
    config = config or LMConfig()
    return cache_dir("small_lm", f"v{MODEL_VERSION}-{config.config_hash()}")
