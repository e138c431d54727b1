"""The streaming perplexity part: real text streamed past a fixed cache budget (StreamingLLM's experiment) with
the full cache, window attention (no sinks), StreamingLLM, H2O and TOVA."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch

from .config import PPL_VARIANTS, KVBenchConfig
from .model import progress

__all__ = ["run_ppl"]


def run_ppl(model: Any, tok: Any, cfg: KVBenchConfig, writer: Any, labels: Sequence[str] | None = None
            ) -> list[dict[str, Any]]:
    """StreamingLLM's language-modelling experiment (Xiao et al. 2024, Sec. 4.1): real text streamed through the
    model with the cache held at a fixed budget (``--ppl-budget`` entries per layer, a count keep), the next-token
    NLL of every position. ``ppl_streams`` independent texts run as one batch; tokens enter ``ppl_chunk`` at a
    time (1 = token by token as in the paper; c > 1 evicts after every c tokens, so the cache holds between the
    budget and budget + c - 1 entries while a chunk is processed). ``labels``: only these of ``PPL_VARIANTS``."""
    from transformers import DynamicCache

    import tokenreduce as tr

    from ...accounting.kv import kv_bytes
    from ...data.text import english_text

    T, S, C = cfg.ppl_tokens, cfg.ppl_streams, cfg.ppl_chunk
    streams = []
    for si in range(S):
        text = english_text(T * 8, start=37 * si)
        streams.append(tok(text, return_tensors="pt").input_ids[:, : T + 1])
    ids = torch.cat(streams, dim=0)
    if ids.shape[1] < T + 1:
        raise ValueError(f"the text gave {ids.shape[1]} tokens, fewer than ppl_tokens + 1 = {T + 1}")
    rows = []
    for label, (name, kw) in PPL_VARIANTS.items():
        if labels is not None and label not in labels:
            continue
        handle = tr.apply(model, name, keep=tr.Keep(count=cfg.ppl_budget), **kw) if name else None
        cache = DynamicCache(config=model.config)
        nll = torch.zeros(S, T)
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                for t in progress(f"ppl {label}", iterable=range(0, T, C), mininterval=2.0):
                    e = min(T, t + C)
                    logits = model(ids[:, t:e], past_key_values=cache, use_cache=True).logits.float()
                    nll[:, t:e] = torch.nn.functional.cross_entropy(
                        logits.reshape(-1, logits.shape[-1]), ids[:, t + 1: e + 1].reshape(-1),
                        reduction="none").view(S, e - t)
            st = handle.stats if handle else None
        finally:
            if handle:
                handle.remove()
        seg = cfg.ppl_segment
        segs = [float(math.exp(nll[:, s: s + seg].mean())) for s in range(0, T, seg)]
        by = kv_bytes(cache)["tensor"]
        sec = time.perf_counter() - t0
        row = {"part": "ppl", "variant": label, "method": name or "none", "budget": None if not name else cfg.ppl_budget,
               "tokens": T, "streams": S, "chunk": C, "ppl": float(math.exp(nll.mean())), "ppl_segments": segs,
               "segment": seg, "ppl_last_segment": segs[-1],
               "ppl_past_budget": float(math.exp(nll[:, cfg.ppl_budget:].mean())), "kv_bytes_end": by,
               "kv_fraction_end": st.kv_kept_fraction if st else 1.0, "seconds": sec, "tokens_per_s": S * T / sec}
        rows.append(writer.write(row))
    return rows
