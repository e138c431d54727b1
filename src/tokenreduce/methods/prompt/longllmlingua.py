"""LongLLMLingua: question-aware coarse-to-fine compression of long contexts (see :class:`LongLLMLingua`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from ...core.text import allocate, coarse_keep, fill_budget, group_units, refine_units
from ...registry import register
from .base import PROMPT, Prompt, PromptMethod

__all__ = ["RESTRICTION", "LongLLMLingua"]

RESTRICTION = "We can get the answer to this question in the given documents."


def _unit_tokens(units: np.ndarray, ntok: np.ndarray) -> np.ndarray:
    return np.bincount(units, weights=ntok).astype(np.int64)


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


@register("longllmlingua", modality="language", integration=PROMPT,
          paper="Jiang et al., LongLLMLingua: Accelerating and Enhancing LLMs in Long Context Scenarios via Prompt "
                "Compression, ACL 2024",
          equation="r_k=mean log p(q,restrict|doc_k); s_i=log p(x_i|q,x_<i)-log p(x_i|x_<i); dynamic ratio by rank")
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
        kept_doc[np.unique(doc[coarse_keep(doc, pc.ntok, r, min(p.n, int(np.ceil(self.coarse_factor * target))),
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
        b = allocate(target, want)
        return np.minimum(b, sizes)

    def select(self, p: Prompt, prep: dict[str, Any], target: int) -> np.ndarray:
        keep = fill_budget(prep["units"], p.pieces.ntok, prep["keys"], target)
        idx = np.flatnonzero(keep)
        if not self.reorder:
            return idx
        return idx[np.lexsort([idx, prep["rank"][prep["doc"][idx]]])]
