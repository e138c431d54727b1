"""Pure, model-free functions for prompt compression (text in, text out).

:class:`Pieces` splits a text into the segments owned by its LM tokens (from the fast tokenizer's
character offsets, no whitespace assumptions), :func:`word_units` and :func:`sentence_units` group pieces
(:func:`refine_units` intersects such groupings), and :func:`fill_budget` picks units by score so that
exactly a target number of LM tokens survives (:func:`coarse_keep`: whole units only, with a floor;
:func:`allocate`: a budget split into exact integer parts).

How a text maps to pieces: token ``i`` owns the characters from the end of the previous tokens up to its
own end, so the gap before a token (a space, a newline, nothing in CJK text) travels with it and the
pieces partition the text exactly: joining all pieces gives the text back, joining a subset never glues
or splits characters. Tokens that share characters (byte-level BPE pieces of one emoji) form one piece.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Pieces", "allocate", "coarse_keep", "fill_budget", "group_units", "refine_units", "sentence_units",
           "word_units"]


# ---------------------------------------------------------------------------- prompts: pieces
@dataclass(frozen=True)
class Pieces:
    """A text partitioned into the segments owned by its LM tokens.

    ``start``/``end`` (P,): character span of each piece; ``ntok`` (P,): LM tokens in it (>= 1, their sum is
    the token count of the text); ``piece_of_token`` (n,): the piece each token belongs to.
    """

    text: str
    start: np.ndarray
    end: np.ndarray
    ntok: np.ndarray
    piece_of_token: np.ndarray

    @classmethod
    def from_offsets(cls, text: str, offsets: Sequence[tuple[int, int]]) -> Pieces:
        """Build from a fast tokenizer's ``offset_mapping`` (one (start, end) per token, no special tokens)."""
        n = len(offsets)
        if n == 0:
            raise ValueError("the text has no tokens")
        L = len(text)
        ends = np.clip(np.asarray([e for _, e in offsets], dtype=np.int64), 0, L)
        cut = np.zeros(n + 1, dtype=np.int64)
        cut[1:n] = np.maximum.accumulate(ends[:-1])  # token i starts where the tokens before it end
        cut[n] = L
        nonempty = cut[1:] > cut[:-1]
        if not nonempty.any():
            raise ValueError("the tokenizer's offsets cover no characters of the text")
        # a token with an empty segment joins the previous piece (or the first piece if it comes first)
        piece_of_token = np.cumsum(nonempty) - 1
        piece_of_token = np.maximum(piece_of_token, 0)
        starts = cut[:-1][nonempty]
        stops = cut[1:][nonempty]
        stops[-1] = L
        starts[0] = 0
        ntok = np.bincount(piece_of_token, minlength=len(starts)).astype(np.int64)
        return cls(text, starts, stops, ntok, piece_of_token)

    @property
    def num_pieces(self) -> int:
        return len(self.start)

    @property
    def num_tokens(self) -> int:
        return int(self.ntok.sum())

    def segment(self, i: int) -> str:
        return self.text[self.start[i]: self.end[i]]

    def join(self, order: Sequence[int]) -> str:
        """Text of the pieces ``order`` (piece indices, in output order)."""
        return "".join(self.text[self.start[i]: self.end[i]] for i in order)

    def spans(self, order: Sequence[int]) -> list[tuple[int, int]]:
        """Character spans of the original text that ``order`` keeps, in output order, contiguous ones merged."""
        out: list[tuple[int, int]] = []
        for i in order:
            s, e = int(self.start[i]), int(self.end[i])
            if out and out[-1][1] == s:
                out[-1] = (out[-1][0], e)
            else:
                out.append((s, e))
        return out

    def token_sums(self, values: np.ndarray, reduce: str = "sum") -> np.ndarray:
        """Per-piece sum/mean/max of per-token ``values`` (n,)."""
        return group_units(self.piece_of_token, values, self.num_pieces, reduce)


def group_units(unit_of_item: np.ndarray, values: np.ndarray, num_units: int, reduce: str = "sum") -> np.ndarray:
    """Reduce per-item ``values`` to per-unit values (sum, mean or max)."""
    v = np.asarray(values, dtype=np.float64)
    s = np.bincount(unit_of_item, weights=v, minlength=num_units)
    if reduce == "sum":
        return s
    if reduce == "mean":
        return s / np.maximum(np.bincount(unit_of_item, minlength=num_units), 1)
    if reduce == "max":
        out = np.full(num_units, -np.inf)
        np.maximum.at(out, unit_of_item, v)
        return out
    raise ValueError(f"reduce must be 'sum', 'mean' or 'max', got {reduce!r}")


def _wide(c: str) -> bool:
    """Characters of scripts written without spaces between words (CJK ideographs, kana, fullwidth forms)."""
    return unicodedata.east_asian_width(c) in ("W", "F")


def word_units(p: Pieces) -> np.ndarray:
    """Unit id per piece: words. A word starts where whitespace starts after non-whitespace (whitespace
    travels with the word after it) and around every wide (CJK) character, so texts without spaces get one
    unit per character group the tokenizer made, never one unit for the whole text."""
    P = p.num_pieces
    new = np.zeros(P, dtype=bool)
    new[0] = True
    t = p.text
    for i in range(1, P):
        a = t[p.start[i]]
        prev = t[p.end[i - 1] - 1]
        if a.isspace():
            new[i] = not prev.isspace()
        elif prev.isspace():
            # a whitespace-only piece starts the word it precedes
            new[i] = not t[p.start[i - 1]: p.end[i - 1]].isspace()
        else:
            new[i] = _wide(a) or _wide(prev)
    return np.cumsum(new) - 1


# a sentence ends after . ! ? ... (optionally closing quotes/brackets) before whitespace, right after a
# CJK terminator, or at a line break
_SENT_END = re.compile(r"[.!?\u2026]+[\"'\u201d\u2019)\]]*(?=\s)|[\u3002\uff01\uff1f\uff0e]+[\u300d\u300f\uff09]*|\n+")


def sentence_units(p: Pieces) -> np.ndarray:
    """Unit id per piece: sentences. A piece belongs to the sentence of its last non-space character."""
    t = p.text
    ends = np.asarray([m.end() for m in _SENT_END.finditer(t)], dtype=np.int64)
    key = np.empty(p.num_pieces, dtype=np.int64)
    for i in range(p.num_pieces):
        seg = t[p.start[i]: p.end[i]]
        stripped = seg.rstrip()
        key[i] = p.start[i] + (len(stripped) if stripped else len(seg)) - 1
    sid = np.searchsorted(ends, key, side="right")  # number of sentence ends at or before the key char
    # renumber to consecutive ids (some sentences own no piece)
    _, inv = np.unique(sid, return_inverse=True)
    return inv.astype(np.int64)


def refine_units(*unit_ids: np.ndarray) -> np.ndarray:
    """Units that never cross a boundary of any of the given unit partitions (e.g. words within sentences)."""
    new = np.zeros(len(unit_ids[0]), dtype=bool)
    new[0] = True
    for u in unit_ids:
        new[1:] |= u[1:] != u[:-1]
    return np.cumsum(new) - 1


# ---------------------------------------------------------------------------- prompts: exact budget
def fill_budget(
    unit_of_piece: np.ndarray,
    ntok: np.ndarray,
    keys: Sequence[np.ndarray] | np.ndarray,
    target: int,
    partial: bool = True,
) -> np.ndarray:
    """Pick units by score so that the kept pieces hold exactly ``target`` tokens (when possible).

    ``keys``: per-unit scores, higher = keep first; a list gives lexicographic keys (primary first); ties go
    to the earlier unit. Greedy: walk units best-first and take every unit that still fits. Units too large
    for the rest of the budget are skipped; if tokens remain, the best skipped unit contributes its leading
    pieces (``partial=True``), so the count is exact unless a single piece holds several tokens.
    Returns a bool mask over pieces.
    """
    unit_of_piece = np.asarray(unit_of_piece, dtype=np.int64)
    ntok = np.asarray(ntok, dtype=np.int64)
    U = int(unit_of_piece.max()) + 1 if len(unit_of_piece) else 0
    size = np.bincount(unit_of_piece, weights=ntok, minlength=U).astype(np.int64)
    if isinstance(keys, np.ndarray) and keys.ndim == 1:
        keys = [keys]
    keys = [np.asarray(k, dtype=np.float64) for k in keys]
    for k in keys:
        if k.shape != (U,):
            raise ValueError(f"unit keys must have shape ({U},), got {k.shape}")
    if not 0 <= target <= int(ntok.sum()):
        raise ValueError(f"target {target} out of range [0, {int(ntok.sum())}]")
    # np.lexsort sorts by the last key first, ascending: negate for descending, unit index breaks ties
    order = np.lexsort([np.arange(U)] + [-np.nan_to_num(k, nan=-np.inf, posinf=np.inf) for k in reversed(keys)])
    take = np.zeros(U, dtype=bool)
    rem = int(target)
    for u in order:
        if rem == 0:
            break
        if size[u] <= rem:
            take[u] = True
            rem -= int(size[u])
    keep = take[unit_of_piece]
    if rem > 0 and partial:
        for u in order:
            if take[u]:
                continue
            for i in np.flatnonzero(unit_of_piece == u):
                if ntok[i] <= rem:
                    keep[i] = True
                    rem -= int(ntok[i])
                if rem == 0:
                    break
            break
    return keep


def coarse_keep(units: np.ndarray, ntok: np.ndarray, score: np.ndarray, budget: int, at_least: int) -> np.ndarray:
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


def allocate(total: int, weights: np.ndarray) -> np.ndarray:
    """Split ``total`` into integers proportional to ``weights`` (cumulative rounding: sums exactly)."""
    c = np.cumsum(weights, dtype=np.float64)
    if c[-1] <= 0:
        return np.zeros(len(weights), dtype=np.int64)
    cum = np.round(c / c[-1] * total).astype(np.int64)
    return np.diff(np.concatenate([[0], cum]))
