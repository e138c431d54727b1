"""LLMLingua: budget controller over sentences, then iterative token-level compression (see
:class:`LLMLingua`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ...core.text import allocate, coarse_keep, fill_budget, group_units, refine_units
from ...registry import register
from .base import PROMPT, Prompt, PromptMethod, in_order

__all__ = ["LLMLingua"]


@register("llmlingua", modality="language", integration=PROMPT,
          paper="Jiang et al., LLMLingua: Compressing Prompts for Accelerated Inference of LLMs, EMNLP 2023",
          equation="sentences by PPL (budget controller); ITPC: top -log p(x_t|compressed prefix) per segment")
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
        coarse = coarse_keep(sent, pc.ntok, ppl, min(p.n, int(np.ceil(self.coarse_factor * target))), target)
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
        budgets = allocate(target, np.asarray([pc.ntok[s].sum() for s in segs], dtype=np.float64))
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
        budgets = allocate(target, np.asarray([pc.ntok[s].sum() for s in segs], dtype=np.float64))
        cond = np.full(pc.num_pieces, np.nan)
        chosen = np.zeros(pc.num_pieces, dtype=bool)
        prefix = [] if sc.bos is None else [sc.bos]
        kept_ids: list[int] = []
        cache, last_h = None, None
        for seg, k_seg in zip(segs, budgets):
            seg_ids = [t for i in seg for t in p.piece_ids(int(i))]
            if cache is None or sc.cache_length(cache) + len(seg_ids) > sc.window:
                cache, last_h = sc.new_cache(prefix + kept_ids[-(sc.window // 2):])
            L0 = sc.cache_length(cache)
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
            sc.keep_cache_positions(cache, idx)
            if len(kept_tok):
                last_h = h[int(kept_tok[-1])]
                kept_ids.extend(seg_ids[int(t)] for t in kept_tok)
        p.seconds_scoring += time.perf_counter() - t0
        return np.nan_to_num(cond, nan=0.0), chosen

    def select(self, p: Prompt, prep: dict[str, np.ndarray], target: int) -> np.ndarray:
        return in_order(fill_budget(prep["units"], p.pieces.ntok, [prep["tier"], prep["score"]], target))
