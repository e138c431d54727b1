"""TokenSkip's training data (Xia et al. 2025, "TokenSkip: Controllable Chain-of-Thought Compression in LLMs",
Sec. 3.1): every chain-of-thought token gets an importance score, and a chain is compressed to ratio gamma by
keeping its ``round(gamma n)`` most important tokens in their original order. The answer (``#`` and the digit
after it) is outside the chain and never dropped.

**Criterion.** TokenSkip scores with LLMLingua-2 (a bidirectional token classifier distilled from GPT-4
compressions); no such model exists for this task's alphabet. Of this project's prompt-compression criteria,
the one that fits is the self-information of Selective Context / LLMLingua (Li et al. 2023, Eq. 1;
:class:`~tokenreduce.methods.prompt.selective_context.SelectiveContext`): ``I(x_t) = -log p(x_t | x_<t)`` under
a causal LM, here **the full-chain model itself, conditioned on the question** (one batched pass of the project's
scorer, :class:`~tokenreduce.adapters.prompt.scorer.CausalScorer`, over ``<bos> question ? chain``). Conditioned
on the question, the restated operands, ``=`` and ``;`` are near-certain for the model (copies and syntax) while
the intermediate results carry the computation, so the results rank first -- what TokenSkip wants to keep
(equations and numbers). Scoring the chain *without* the question (``tr.compress`` on the chain alone) would
invert that: the copied operands become unpredictable and the results predictable from the chain itself. The
budget is exact (:func:`tokenreduce.core.text.fill_budget`, ties to the earlier token). ``"random"`` (uniform
scores, seeded) is the control criterion.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tokenreduce.data.chains import ChainProblem

from ...adapters.prompt.scorer import get_scorer
from ...core.text import fill_budget
from .config import CRITERIA
from .tokenizer import build_tokenizer, prompt_text

__all__ = ["ROLES", "chain_importance", "compress_chain", "compressed_chains", "keep_mask", "kept_by_role"]


def chain_importance(model: Any, problems: Sequence[ChainProblem], criterion: str = "self-information",
                     seed: int = 0, force_keep: str = "") -> list[np.ndarray]:
    """One score per chain token of each problem (higher = keep first): ``-log p(token | <bos> question ?
    chain so far)`` under ``model`` (``"self-information"``) or seeded uniform scores (``"random"``); the
    characters of ``force_keep`` rank above every other token (LLMLingua's ``force_tokens``)."""
    scores = _scores(model, problems, criterion, seed)
    if not force_keep:
        return scores
    return [s + FORCED * np.isin(np.array(list(p.chain)), list(force_keep)) for p, s in zip(problems, scores)]


#: the score bonus of a forced token (self-information is a few nats; uniform scores are < 1)
FORCED = 1e6


def _scores(model: Any, problems: Sequence[ChainProblem], criterion: str, seed: int) -> list[np.ndarray]:
    if criterion not in CRITERIA:
        raise ValueError(f"criterion={criterion!r} is invalid: one of {', '.join(CRITERIA)}")
    tok = build_tokenizer()
    chains = tok([p.chain for p in problems], add_special_tokens=False)["input_ids"]
    if criterion == "random":
        rng = np.random.default_rng(seed)
        return [rng.random(len(c)) for c in chains]
    prompts = tok([prompt_text(p.question) for p in problems], add_special_tokens=False)["input_ids"]
    seqs = [[tok.bos_token_id, *p, *c] for p, c in zip(prompts, chains)]
    spans = [(1 + len(p), 1 + len(p) + len(c)) for p, c in zip(prompts, chains)]
    scorer = get_scorer(model, tok, head_mode="exact")
    return [-np.asarray(lp, dtype=np.float64) for lp in scorer.logprobs(seqs, spans)]


def keep_mask(scores: np.ndarray, gamma: float) -> np.ndarray:
    """Which of ``len(scores)`` chain tokens survive at ratio ``gamma`` in (0, 1]: the ``round(gamma n)`` (at
    least one) highest-scoring ones, ties to the earlier token."""
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma={gamma!r} is out of range: must be in (0, 1]")
    n = len(scores)
    target = max(1, round(gamma * n))
    if target >= n:
        return np.ones(n, dtype=bool)
    return fill_budget(np.arange(n), np.ones(n, dtype=np.int64), np.asarray(scores, dtype=np.float64), target)


def compress_chain(chain: str, scores: np.ndarray, gamma: float) -> str:
    """The ``round(gamma n)`` highest-scoring tokens of ``chain`` (one character each; at least one) in their
    order; ``gamma`` in (0, 1], 1.0 returns the chain unchanged."""
    if len(scores) != len(chain):
        raise ValueError(f"{len(scores)} scores for a chain of {len(chain)} tokens")
    return "".join(c for c, k in zip(chain, keep_mask(scores, gamma)) if k)


#: the role of each character of a chain step ``a op b = c ;``
ROLES = ("restated", "restated", "restated", "syntax", "result", "syntax")


def kept_by_role(model: Any, problems: Sequence[ChainProblem], gammas: Sequence[float],
                 criterion: str = "self-information", seed: int = 0, force_keep: str = "") -> dict[str, dict[str, float]]:
    """What compression keeps: per gamma, the share of the chains' results, restated operands (``a op b``) and
    syntax (``=``, ``;``) that survive (a diagnostic of the criterion)."""
    scores = chain_importance(model, problems, criterion, seed, force_keep)
    out = {}
    for g in gammas:
        kept = {r: [0, 0] for r in set(ROLES)}
        for s in scores:
            for i, k in enumerate(keep_mask(s, g)):
                kept[ROLES[i % 6]][0] += int(k)
                kept[ROLES[i % 6]][1] += 1
        out[f"{g:g}"] = {r: a / b for r, (a, b) in sorted(kept.items())}
    return out


def compressed_chains(model: Any, problems: Sequence[ChainProblem], gammas: Sequence[float],
                      criterion: str = "self-information", seed: int = 0, force_keep: str = "") -> list[str]:
    """The chain of ``problems[i]`` compressed to ``gammas[i]`` (one scoring pass for all of them)."""
    if len(gammas) != len(problems):
        raise ValueError(f"{len(gammas)} ratios for {len(problems)} problems")
    scores = chain_importance(model, problems, criterion, seed, force_keep)
    return [compress_chain(p.chain, s, g) for p, s, g in zip(problems, scores, gammas)]
