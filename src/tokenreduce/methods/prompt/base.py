"""What every prompt-compression method shares: :class:`Prompt` (the text as the methods see it, like
``KVContext`` for KV-cache methods) and the :class:`PromptMethod` base class.

Each method is a short composition of a unit (token | word | sentence | document), a criterion scoring the
units, and the exact token budget of :func:`tokenreduce.core.text.fill_budget`. A :class:`PromptMethod` has
two steps, so that the budget loop of :func:`tokenreduce.compress` can re-select without re-scoring:
``prepare(prompt, target)`` runs the scorer (the expensive part, once) and ``select(prompt, prepared,
target)`` returns the kept pieces in output order (cheap).

=================  ==========================================================================================
method             criterion -> strategy
=================  ==========================================================================================
truncate           position -> keep the first ``keep`` tokens
random             seeded uniform scores per word -> top words
selective-context  self-information I(u) = sum_{t in u} -log p(x_t | x_<t) (one LM pass) -> top units
llmlingua          sentence perplexity -> keep sentences (coarse budget controller); then per segment, token
                   self-information conditioned on the already compressed prefix (ITPC) -> top tokens
longllmlingua      document score -mean log p(question | doc) -> keep + reorder documents; per-document
                   budget by rank (dynamic ratio); contrastive perplexity log p(x|q,x<) - log p(x|x<)
extractive         cosine(MiniLM(sentence), MiniLM(question)) -> top sentences (EXIT-style extraction)
=================  ==========================================================================================

The :class:`Prompt` splits the input into pieces owned by the LM's tokens (character offsets of the fast
tokenizer, :class:`tokenreduce.core.text.Pieces`), so kept pieces join back into text without any
whitespace assumption, and identity (keep=1) returns the text unchanged. The models behind the criteria
come in from outside (:func:`tokenreduce.compress` builds them in the adapters layer): a causal-LM
``scorer`` (:class:`TokenScorer`, e.g. :class:`tokenreduce.adapters.prompt.scorer.CausalScorer`) and a
sentence ``embedder`` (:data:`Embedder`, e.g. :func:`tokenreduce.adapters.minilm.embed_sentences`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar, Protocol

import numpy as np
from torch import Tensor

from ...core.text import Pieces, sentence_units, word_units

__all__ = ["PROMPT", "Embedder", "Prompt", "PromptMethod", "TokenScorer", "in_order"]

PROMPT = "prompt"

#: ``embedder(texts, encoder)`` -> (len(texts), D) sentence embeddings; ``encoder`` is the method's own
#: ``encoder`` knob (None = the default sentence encoder).
Embedder = Callable[[list[str], Any], Tensor]


class TokenScorer(Protocol):
    """What the methods use of a causal-LM scorer (:class:`tokenreduce.adapters.prompt.scorer.CausalScorer`):
    ``bos`` (the ``<bos>`` id or None) and ``window`` (longest sequence per forward)."""

    bos: int | None
    window: int

    def text_logprobs(self, ids: Sequence[int]) -> np.ndarray: ...

    def logprobs(self, seqs: Sequence[Sequence[int]],
                 spans: Sequence[tuple[int, int]] | None = None) -> list[np.ndarray]: ...

    def hidden_states(self, seqs: Sequence[Sequence[int]]) -> list[Tensor] | None: ...

    def hidden(self, ids: Tensor, mask: Tensor | None = None, cache: Any = None) -> Tensor: ...

    def head_logprobs(self, h: Tensor, targets: Tensor, exact: bool | None = None) -> Tensor: ...

    def new_cache(self, ctx: list[int]) -> tuple[Any, Tensor | None]: ...

    def cache_length(self, cache: Any) -> int: ...

    def keep_cache_positions(self, cache: Any, idx: Tensor) -> None: ...


class Prompt:
    """The text to compress as the methods see it: LM token ids, pieces, units, cached scores, and the models
    behind the criteria (``scorer``: a causal-LM :class:`TokenScorer`; ``embedder``: an :data:`Embedder`)."""

    def __init__(self, text: str, tokenizer: Any, question: str | None = None, scorer: TokenScorer | None = None,
                 target: int = 0, embedder: Embedder | None = None) -> None:
        self.text, self.tokenizer, self.question, self.scorer = text, tokenizer, question, scorer
        self.embedder = embedder
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        self.ids = np.asarray(enc["input_ids"], dtype=np.int64)
        if len(self.ids) == 0:
            raise ValueError(f"text {text[:40]!r} has no tokens under the LM's tokenizer")
        self.pieces = Pieces.from_offsets(text, enc["offset_mapping"])
        self.target = target
        self.seconds_scoring = 0.0

    @property
    def n(self) -> int:
        return len(self.ids)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def count(self, text: str) -> int:
        return len(self.encode(text)) if text else 0

    @cached_property
    def token_start(self) -> np.ndarray:
        """Index of the first token of each piece (pieces own contiguous tokens)."""
        return np.concatenate([[0], np.cumsum(self.pieces.ntok)[:-1]]).astype(np.int64)

    def piece_ids(self, i: int) -> list[int]:
        s = int(self.token_start[i])
        return self.ids[s: s + int(self.pieces.ntok[i])].tolist()

    def units(self, unit: str) -> np.ndarray:
        """Unit id per piece: "token" (each piece), "word", "sentence"."""
        if unit == "token":
            return np.arange(self.pieces.num_pieces)
        if unit == "word":
            return self.words
        if unit == "sentence":
            return self.sentences
        raise ValueError(f"unit must be 'token', 'word' or 'sentence', got {unit!r}")

    @cached_property
    def words(self) -> np.ndarray:
        return word_units(self.pieces)

    @cached_property
    def sentences(self) -> np.ndarray:
        return sentence_units(self.pieces)

    def need_scorer(self, who: str) -> TokenScorer:
        if self.scorer is None:
            raise ValueError(f"method {who!r} scores tokens with a causal LM: pass lm=<a transformers causal LM>")
        return self.scorer

    def need_embedder(self, who: str) -> Embedder:
        if self.embedder is None:
            raise ValueError(f"method {who!r} embeds sentences: pass embedder=<texts, encoder -> embeddings> "
                             "(tr.compress does)")
        return self.embedder

    @cached_property
    def self_information(self) -> np.ndarray:
        """-log p(x_t | x_<t) per token (n,), one batched pass; an unpredictable first token gets the max."""
        t0 = time.perf_counter()
        lp = self.need_scorer("self-information").text_logprobs(self.ids.tolist())
        si = -lp
        if np.isnan(si).any():
            si[np.isnan(si)] = np.nanmax(si) if np.isfinite(si).any() else 0.0
        self.seconds_scoring += time.perf_counter() - t0
        return si


@dataclass
class PromptMethod:
    """Base class. ``needs_lm``: uses the causal LM scorer; ``needs_question``: question-aware;
    ``needs_encoder``: embeds sentences (the prompt's ``embedder``)."""

    needs_lm: ClassVar[bool] = False
    needs_question: ClassVar[bool] = False
    needs_encoder: ClassVar[bool] = False

    def prepare(self, p: Prompt, target: int) -> Any:
        return None

    def select(self, p: Prompt, prep: Any, target: int) -> np.ndarray:
        raise NotImplementedError


def in_order(keep: np.ndarray) -> np.ndarray:
    """Indices of the kept pieces (bool mask over pieces), in text order."""
    return np.flatnonzero(keep)
