"""Configurations of the reasoning LM and of its TokenSkip fine-tune, and the addresses of their cached
checkpoints: ``cache_dir("reasoner", "v<MODEL_VERSION>-<hash>")`` (:func:`checkpoint_dir`) and
``cache_dir("reasoner", "tokenskip-v<MODEL_VERSION>-<hash>")`` (:func:`tokenskip_dir`, the hash covers the
base model's), so a change of any field never loads stale weights."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from tokenreduce._paths import cache_dir
from tokenreduce.data.chains import ChainTaskConfig

from ...core.errors import check_int
from ..checkpoint import JsonFields, StoredConfig, short_hash
from .tokenizer import gamma_token, vocabulary

__all__ = ["CRITERIA", "MODEL_VERSION", "ReasonerConfig", "TokenSkipConfig", "checkpoint_dir", "tokenskip_dir"]

#: Bump when the training code changes in a way that changes the weights.
MODEL_VERSION = 1
#: how TokenSkip scores chain tokens (:mod:`tokenreduce.models.reasoning.compress`)
CRITERIA = ("self-information", "random")


def _check_range(name: str, value: float, lo: float, hi: float, lo_open: bool = True) -> None:
    ok = (lo < value if lo_open else lo <= value) and value <= hi
    if not ok or math.isnan(value):
        raise ValueError(f"{name}={value!r} is out of range: must be in {'(' if lo_open else '['}{lo}, {hi}]")


@dataclass(frozen=True)
class ReasonerConfig(StoredConfig):
    """The full-chain model: a ``LlamaForCausalLM`` (``hidden``, ``layers``, ``heads``, ``mlp`` = intermediate
    size; tied embeddings) trained from scratch on ``steps`` x ``batch_size`` fresh problems of ``task`` with
    the loss on the completion only (chain, answer, ``<eos>``). ``chain=False``: the answer right after the
    prompt (the no-chain-of-thought control). AdamW with warm-up + cosine. ``val_items`` held-out problems
    measure the result; ``num_threads`` only changes speed."""

    task: ChainTaskConfig = field(default_factory=ChainTaskConfig)
    chain: bool = True
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    mlp: int = 384
    max_positions: int = 128
    steps: int = 1200
    batch_size: int = 32
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.05
    warmup_fraction: float = 0.03
    grad_clip: float = 1.0
    seed: int = 0
    val_items: int = 500
    num_threads: int = 1

    _HASH_EXCLUDED: ClassVar[frozenset[str]] = frozenset({"num_threads", "val_items"})
    _JSON_FIELDS: ClassVar[JsonFields] = {"task": (dict, lambda d: ChainTaskConfig(**d))}

    def __post_init__(self) -> None:
        for name in ("hidden", "layers", "heads", "mlp", "max_positions", "steps", "batch_size", "val_items",
                     "num_threads"):
            check_int(name, getattr(self, name))
        check_int("seed", self.seed, 0)
        if self.hidden % self.heads:
            raise ValueError(f"heads={self.heads} must divide hidden={self.hidden}")
        need = 7 + 2 * self.task.max_ops + 6 * self.task.max_ops * self.chain  # <bos> q ? <g> chain # a <eos>
        if self.max_positions < need:
            raise ValueError(f"max_positions={self.max_positions} is too short for {self.task.max_ops} operations "
                             f"(the longest sequence has {need} tokens)")
        _check_range("lr", self.lr, 0.0, 1.0)
        _check_range("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0, lo_open=False)
        _check_range("weight_decay", self.weight_decay, 0.0, 10.0, lo_open=False)
        _check_range("warmup_fraction", self.warmup_fraction, 0.0, 1.0, lo_open=False)
        _check_range("grad_clip", self.grad_clip, 0.0, math.inf)

    def llama_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``transformers.LlamaConfig`` for this model."""
        return {"vocab_size": len(vocabulary()), "hidden_size": self.hidden, "num_hidden_layers": self.layers,
                "num_attention_heads": self.heads, "num_key_value_heads": self.heads,
                "intermediate_size": self.mlp, "max_position_embeddings": self.max_positions,
                "tie_word_embeddings": True, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}

    def config_hash(self) -> str:
        return short_hash({**self.hash_payload(), "_version": MODEL_VERSION}, compact=True)


@dataclass(frozen=True)
class TokenSkipConfig(StoredConfig):
    """TokenSkip (Xia et al. 2025, Sec. 3): the chains of ``n_problems`` training problems are scored by
    ``criterion`` and compressed to each ratio of ``gammas`` (kept tokens in order, the answer never touched);
    every problem gets one ratio at random (the paper's mixture) and ``<g..>`` in its prompt; the full-chain
    model ``base`` is then fine-tuned (all weights; the paper uses LoRA on 7-14B models) for ``steps``."""

    base: ReasonerConfig = field(default_factory=ReasonerConfig)
    gammas: tuple[float, ...] = (1.0, 0.8, 0.6, 0.4)
    criterion: str = "self-information"
    n_problems: int = 8000
    steps: int = 600
    batch_size: int = 32
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_fraction: float = 0.03
    seed: int = 1
    num_threads: int = 1
    #: characters always kept in a compressed chain (inside its budget): TokenSkip's Llama-3 recipe passes
    #: ``force_tokens=['Step', ':']`` to LLMLingua-2; here the step separator ``;`` and ``=`` play that part
    #: (``""``: none, the first fine-tune; absent from the hash when empty)
    force_keep: str = ""

    _HASH_EXCLUDED: ClassVar[frozenset[str]] = frozenset({"num_threads"})
    _JSON_FIELDS: ClassVar[JsonFields] = {"base": (dict, ReasonerConfig.from_dict), "gammas": (list, tuple)}

    def __post_init__(self) -> None:
        if not self.base.chain:
            raise ValueError("TokenSkip compresses chains of thought: its base model needs chain=True")
        if not self.gammas:
            raise ValueError("gammas is empty: give the compression ratios, e.g. (1.0, 0.8, 0.6, 0.4)")
        for g in self.gammas:
            gamma_token(g)
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion={self.criterion!r} is invalid: one of {', '.join(CRITERIA)}")
        for name in ("n_problems", "steps", "batch_size", "num_threads"):
            check_int(name, getattr(self, name))
        check_int("seed", self.seed, 0)
        _check_range("lr", self.lr, 0.0, 1.0)
        _check_range("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0, lo_open=False)
        _check_range("warmup_fraction", self.warmup_fraction, 0.0, 1.0, lo_open=False)

    def config_hash(self) -> str:
        payload = self.hash_payload()
        payload["base"] = self.base.config_hash()
        if not self.force_keep:
            payload.pop("force_keep")
        return short_hash({**payload, "_version": MODEL_VERSION}, compact=True)


def checkpoint_dir(config: ReasonerConfig | None = None) -> Path:
    """Cache directory of the full-chain (or no-chain) model of ``config`` (created if missing)."""
    config = config or ReasonerConfig()
    return cache_dir("reasoner", f"v{MODEL_VERSION}-{config.config_hash()}")


def tokenskip_dir(config: TokenSkipConfig | None = None) -> Path:
    """Cache directory of the TokenSkip fine-tune of ``config`` (created if missing)."""
    config = config or TokenSkipConfig()
    return cache_dir("reasoner", f"tokenskip-v{MODEL_VERSION}-{config.config_hash()}")
