"""`tokenreduce bench kv`: KV-cache methods on the real Gemma 3 270M (CPU), in one process per part:

* **passcode** — retrieval of a 5-digit pass key hidden at several depths in real English filler (Lee corpus),
  contexts of ``--lengths`` tokens; the question is kept uncompressed (``question_len``); accuracy per
  method x keep with the *real* KV kept (bytes of the cache tensors right after the prompt / the unreduced
  cache's bytes) and the kept entries per layer;
* **ppl** — perplexity of real text streamed token by token past a fixed cache budget (StreamingLLM's
  experiment): the full cache, window attention (no sinks), StreamingLLM, H2O, TOVA;
* **timing** — prefill seconds, decode tokens/s, peak tensor memory and KV bytes against the unreduced model,
  interleaved in the same process (``--timing-lengths``), also with generate()'s chunked prefill (then the
  decoding methods evict between chunks, so prefill attention itself shrinks); every ratio is the median of the
  per-round paired ratios with quartiles and extremes; ``--clock cpu --threads 1`` times process CPU seconds
  (robust on a shared machine; the 1-min load average is recorded); ``--timing-kvpress`` adds kvpress presses
  to the same rounds (run in kvpress's venv, prompts from ``--timing-prompts``, the export part's JSON);
* **kvpress** — side by side with NVIDIA kvpress 0.5.5 (its own venv; ``scripts/kvpress_compare.py`` reads the
  prompts this bench exports and writes ``kvpress.jsonl``): accuracies, timings, and agreement of the kept
  positions for identically configured methods (ours with ``rounding="floor"`` like kvpress's ``int(n k)``).

Results: ``<out>/kv.jsonl`` (one run per invocation, with metadata), ``<out>/*.png`` and ``<out>/report.html``.
Parts run separately (other venvs, prompt ranges, lengths) are combined with ``--merge a.jsonl,b.jsonl@part``
(appended to ``<out>/kv.jsonl``; the report keeps the latest run per configuration). The same-process kvpress
timing (tokenreduce installed in kvpress's venv with ``pip install -e . --no-deps``)::

    tokenreduce bench kv --parts export,timing --timing-lengths 4096 --threads 1 --clock cpu --out results/kv/t
    flock /tmp/tokenreduce-timing.lock /work/kvpress-venv/bin/python -m tokenreduce.bench.kv --parts timing \
        --timing-prompts results/kv/t/kvpress_prompts.json --timing-lengths 4096 --threads 1 --clock cpu \
        --timing-kvpress none,SnapKVPress@0.25,StreamingLLMPress@0.25 --timing-label "kvpress venv" --out results/kv/k
    tokenreduce bench kv --report-only --out results/kv --merge results/kv/t/kv.jsonl@timing,results/kv/k/kv.jsonl
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import types
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "AGREEMENT_CONFIGS",
    "PPL_VARIANTS",
    "TIMING_CANDIDATES",
    "VARIANTS",
    "build_report",
    "merge_results",
    "parse_kvpress_candidate",
    "passcode_prompts",
    "register_cli",
    "run_kv_bench",
]

# label -> (registered method, keyword arguments); "question" windows use the question as SnapKV's window
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "streaming-llm": ("streaming-llm", {}),
    "h2o": ("h2o", {}),
    "tova": ("tova", {}),
    "snapkv": ("snapkv", {}),  # paper defaults: window 32, avgpool kernel 5
    "snapkv-q": ("snapkv", {"window_size": "question"}),
    "snapkv-q-max9": ("snapkv", {"window_size": "question", "pooling": "maxpool", "kernel_size": 9}),
    "pyramidkv-q": ("pyramidkv", {"window_size": "question"}),
    "knorm": ("knorm", {}),
    "random": ("random", {}),
    "tokenselect": ("tokenselect", {"n_init": 4, "n_local": 16}),  # paper's 128/512 exceed 1k-token budgets
    "gemfilter": ("gemfilter", {}),  # paper: last query, avgpool 5 (+ the question kept, as every variant here)
    "gemfilter-q-max9": ("gemfilter", {"window_size": "question", "pooling": "maxpool", "kernel_size": 9}),
    # diagnostics (not run by default): StreamingLLM on Gemma's global layers only, sliding layers untouched
    # (what kvpress's default does), to separate the method from the cost of shrinking the sliding windows
    "streaming-llm-global": ("streaming-llm", {"layers": "global"}),
}
DEFAULT_VARIANTS = tuple(v for v in VARIANTS if v != "streaming-llm-global")
PPL_VARIANTS: dict[str, tuple[str | None, dict[str, Any]]] = {
    "full cache": (None, {}),
    "window (no sinks)": ("streaming-llm", {"sinks": 0}),
    "streaming-llm": ("streaming-llm", {"sinks": 4}),
    "h2o": ("h2o", {}),
    "tova": ("tova", {}),
}
# label -> (method or None, keep, generate() prefill chunk or None, kwargs)
TIMING_CANDIDATES: dict[str, tuple[str | None, float | None, int | None, dict[str, Any]]] = {
    "none": (None, None, None, {}),
    "none + chunked prefill": (None, None, 512, {}),
    "snapkv-q-max9@0.25": ("snapkv", 0.25, None, {"window_size": "question", "pooling": "maxpool", "kernel_size": 9}),
    "knorm@0.25": ("knorm", 0.25, None, {}),
    "streaming-llm@0.25 + chunked": ("streaming-llm", 0.25, 512, {}),
    "tova@0.25 + chunked": ("tova", 0.25, 512, {}),
    "h2o@0.25 + chunked": ("h2o", 0.25, 512, {}),
    "pyramidkv-q@0.25": ("pyramidkv", 0.25, None, {"window_size": "question"}),
    "tokenselect@0.25": ("tokenselect", 0.25, None, {"n_init": 4, "n_local": 16}),
    "random@0.25": ("random", 0.25, None, {}),
    "gemfilter-q-max9@0.25": ("gemfilter", 0.25, None, {"window_size": "question", "pooling": "maxpool",
                                                         "kernel_size": 9}),
    "gemfilter-q-max9@0.25 + chunked": ("gemfilter", 0.25, 512, {"window_size": "question", "pooling": "maxpool",
                                                                 "kernel_size": 9}),
}
# configurations ours and kvpress share exactly (context compressed alone, no question, floor budgets)
AGREEMENT_CONFIGS: dict[str, dict[str, Any]] = {
    "snapkv": {"ours": ("snapkv", {"window_size": 64, "kernel_size": 5}), "kvpress": ("SnapKVPress",
                                                                                      {"window_size": 64,
                                                                                       "kernel_size": 5})},
    "knorm": {"ours": ("knorm", {}), "kvpress": ("KnormPress", {})},
    "streaming-llm": {"ours": ("streaming-llm", {"sinks": 4}), "kvpress": ("StreamingLLMPress", {"n_sink": 4})},
    "tova": {"ours": ("tova", {}), "kvpress": ("TOVAPress", {})},
}
DEPTHS = [0.1, 0.3, 0.5, 0.7, 0.9]
REPORT_NOTES = (
    "KV-cache reduction measured on CPU (fp32, SDPA). kv_fraction = bytes of the real cache tensors right after the "
    "prompt / the bytes transformers' default DynamicCache(config) holds for the same prompt (Gemma 3: 15 sliding "
    "layers hold their last 511 entries, 3 global layers the whole prompt); every layer is compressed. Passcode "
    "cells are evaluated from one captured prompt forward replayed per method (adapters.llm.replay_prefill; "
    "replay_checked cells were also run through generate(): replay_mismatches must be 0). tokenselect selects per "
    "query from the whole cache (kv_fraction 1 by design). kvpress rows: 'all' = its pipeline's config-less cache "
    "(sliding layers hold the whole prompt, so its fractions are relative to a 1.8x larger cache); 'global' = its "
    "Gemma 3 default (sliding layers untouched: real fraction 0.93/0.85/0.78 at keep 0.75/0.5/0.25); '(question "
    "stepwise)' = the question fed one token per forward, which avoids the non-causal question mask transformers "
    "5.2 builds for a multi-token forward on a compressed cache. Timing: '+ chunked' = generate(prefill_chunk_size="
    "512); the decoding methods (streaming-llm, tova) evict between chunks, snapkv/knorm compress once after the "
    "full prompt. 'vs none+chunked' compares with the unreduced model under the same chunked prefill (chunking "
    "alone is faster on CPU: SDPA's masked sliding-window layers attend to the whole prompt in one forward). "
    "kvpress:* rows = kvpress's own path (context forward under press(model), then its pipeline's generate_answer) "
    "in the same process and rounds (kvpress's venv, transformers 5.2); kvpress:none = that path without a press "
    "(its config-less cache keeps every layer's whole prompt, 3.7x our unreduced KV bytes at 4k). Under "
    "transformers 5.2 generate(prefill_chunk_size=...) on Gemma 3 answers wrongly even unreduced (5.23: the same "
    "answer as one forward), so the '+ chunked' rows of the kvpress-venv table time a broken computation. "
    "gemfilter rows: the prompt is filtered by an early full-attention layer and generation runs on the kept tokens "
    "(no replay; kv_fraction counts the sliding layers' unchanged 511-entry windows, so it exceeds keep); "
    "'+ chunked' also chunks its filter pass. "
    "kv_bytes = after the prompt, kv_bytes_end = after the last token; peak memory and KV bytes come from the "
    "untimed memory part when it ran (before 2026-11-25 the adapter's prompt snapshot under chunked prefill was "
    "taken after the first chunk).")


@dataclass
class KVBenchConfig:
    parts: Sequence[str] = ("passcode", "ppl", "timing")
    variants: Sequence[str] = DEFAULT_VARIANTS
    keeps: Sequence[float] = (0.5, 0.25, 0.1)
    lengths: Sequence[int] = (1100,)
    n_prompts: int = 8
    max_new_tokens: int = 7
    ppl_tokens: int = 1536
    ppl_budget: int = 256
    ppl_segment: int = 128
    ppl_streams: int = 2
    ppl_chunk: int = 8
    timing_lengths: Sequence[int] = (1024, 4096)
    timing_new_tokens: int = 32
    timing_candidates: Sequence[str] = tuple(TIMING_CANDIDATES)
    timing_memory: bool = True  # peak memory inside the timing part (else: the separate "memory" part)
    timing_kvpress: Sequence[str] = ()  # kvpress presses timed in the same rounds ("SnapKVPress@0.25[/global]")
    timing_prompts: str | None = None  # JSON with "timing" prompts (export part): venvs without the text data
    timing_label: str = "main"  # names a timing run (the report shows one table per label, e.g. "kvpress venv")
    clock: str = "wall"  # "cpu": process CPU time (one thread), immune to time slices lost on a shared machine
    repeats: int = 3
    agreement_keeps: Sequence[float] = (0.5, 0.25)
    threads: int | None = 2
    dtype: str = "fp32"
    attn: str = "sdpa"
    out: str = "results/kv"
    seed: int = 0
    baseline: bool = True  # run the unreduced model in the passcode part (skip when merging runs)
    replay: bool = True  # one prompt forward per prompt, replayed for every method (adapters.llm.replay_prefill)
    check_replay: int = 1  # prompts on which every cell is also run through generate() to check the replay
    prompt_range: tuple[int, int] | None = None  # run only prompts [a, b) of the n (the report merges samples)


# ============================================================================ shared helpers
def _load(cfg: KVBenchConfig):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ..models.gemma import gemma_cache_ready, load_gemma

    if not gemma_cache_ready():
        raise FileNotFoundError("the Gemma 3 270M checkpoint is not cached; build it with "
                                "`python scripts/convert_gemma.py` first")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.dtype]
    model, tok = load_gemma(dtype=dtype, attn_implementation=cfg.attn)
    model.generation_config.eos_token_id = None  # fixed-length continuations
    return model, tok


def passcode_prompts(tok: Any, length: int, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Passcode prompts (real filler) as dicts: prompt, context, answer, depth, tokens, question_len."""
    from ..adapters.llm import question_length
    from ..data.passcode import make_passcode_samples

    samples = make_passcode_samples(n, length, lambda s: len(tok(s).input_ids), depths=DEPTHS, seed=seed)
    out = []
    for i, s in enumerate(samples):
        out.append({"id": f"{length}-{i}", "prompt": s.prompt, "context": s.context,
                    "question": s.prompt[len(s.context):], "answer": s.answer, "depth": s.depth,
                    "tokens": len(tok(s.prompt).input_ids), "question_len": question_length(tok, s.context, s.prompt),
                    "length": length})
    return out


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def _resolve(model: Any, kw: dict[str, Any]) -> dict[str, Any]:
    """``layers="global"|"sliding"`` -> the indices of those layers in the model's ``config.layer_types``."""
    if kw.get("layers") in ("global", "sliding"):
        want = "full_attention" if kw["layers"] == "global" else "sliding_attention"
        types = getattr(model.config, "layer_types", None) or ["full_attention"] * model.config.num_hidden_layers
        kw = dict(kw, layers=[i for i, t in enumerate(types) if t == want])
    return kw


def _greedy(model: Any, ids: torch.Tensor, n: int, **kw: Any) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, **kw)


# ============================================================================ (a) passcode
def _replay_greedy(model: Any, handle: Any | None, cap: Any, n: int) -> torch.Tensor:
    """Greedy continuation of ``n`` tokens after a replayed prefill (:func:`~tokenreduce.adapters.llm.replay_prefill`):
    the same forwards ``generate()`` makes (one token each, logical positions from the cache). Returns
    prompt + continuation like ``generate()``. ``handle=None``: the unreduced model, from the captured cache."""
    from ..adapters.llm import replay_prefill

    cache = replay_prefill(handle, cap) if handle is not None else cap.cache
    nxt = cap.last_logits.argmax(-1, keepdim=True)
    toks, mask = [nxt], cap.attention_mask
    with torch.inference_mode():
        for _ in range(n - 1):
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            logits = model(input_ids=nxt, attention_mask=mask, past_key_values=cache, use_cache=True,
                           logits_to_keep=1).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            toks.append(nxt)
    return torch.cat([cap.input_ids, *toks], dim=1)


def run_passcode(model: Any, tok: Any, cfg: KVBenchConfig, writer: Any) -> list[dict[str, Any]]:
    import tokenreduce as tr

    from ..adapters.llm import capture_prefill

    rows: list[dict[str, Any]] = []
    for length in cfg.lengths:
        prompts = passcode_prompts(tok, length, cfg.n_prompts, cfg.seed)
        writer.write(part="prompts", length=length, prompts=prompts)
        if cfg.prompt_range is not None:  # a slice of the n prompts (parallel runs merged by the report)
            prompts = prompts[cfg.prompt_range[0]: cfg.prompt_range[1]]
        combos = [(v, k) for v in cfg.variants for k in cfg.keeps]
        if cfg.baseline:
            combos = [("none", 1.0), *combos]
        per: dict[tuple[str, float], list[dict[str, Any]]] = {c: [] for c in combos}
        bar = _progress(len(prompts) * len(combos), f"passcode {length} tok")
        for pi, p in enumerate(prompts):
            ids = tok(p["prompt"], return_tensors="pt").input_ids
            cap = capture_prefill(model, ids) if cfg.replay else None  # one prompt forward for every method
            for variant, keep in combos:
                t0 = time.perf_counter()
                rec: dict[str, Any] = {"prompt": p["id"], "depth": p["depth"], "tokens": p["tokens"]}
                try:
                    if variant == "none":
                        if cap is not None and pi >= cfg.check_replay:
                            out = _replay_greedy(model, None, cap, cfg.max_new_tokens)
                        else:
                            out = _greedy(model, ids, cfg.max_new_tokens)
                        rec.update(kv_fraction=1.0, kv_bytes=None, kept=None, replayed=pi >= cfg.check_replay)
                    else:
                        name, kw = VARIANTS[variant]
                        with tr.apply(model, name, keep=keep, question_len=p["question_len"],
                                      **_resolve(model, kw)) as h:
                            # a prompt filter (GemFilter) changes the prompt forward itself: no replay
                            replay = cap is not None and h.method.phase != "filter"
                            if replay:
                                out = _replay_greedy(model, h, cap, cfg.max_new_tokens)
                            else:
                                out = _greedy(model, ids, cfg.max_new_tokens)
                            st = h.stats
                        rec.update(kv_fraction=st.prefill_kept_fraction, kv_bytes=st.prefill_kv_bytes,
                                   kv_bytes_unreduced=st.prefill_kv_bytes_unreduced,
                                   kept=[k[0] for k in st.prefill_kept], replayed=replay)
                        if replay and pi < cfg.check_replay:  # the real path must give the same tokens
                            with tr.apply(model, name, keep=keep, question_len=p["question_len"],
                                          **_resolve(model, kw)) as h2:
                                ref = _greedy(model, ids, cfg.max_new_tokens)
                            rec["replay_matches_generate"] = bool(torch.equal(ref, out))
                            rec["replay_matches_kv_bytes"] = h2.stats.prefill_kv_bytes == st.prefill_kv_bytes
                    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
                    rec.update(output=text, correct=p["answer"] in text, error=None)
                except (ValueError, TypeError) as e:  # e.g. a budget smaller than a method's window
                    rec.update(output=None, correct=None, error=str(e))
                rec["seconds"] = time.perf_counter() - t0
                per[(variant, keep)].append(rec)
                writer.write(part="passcode_sample", variant=variant, keep=keep, length=length, **rec)
                bar.update(1)
            del cap
        bar.close()
        for (variant, keep), recs in per.items():
            ok = [r for r in recs if r["error"] is None]
            n_correct = sum(bool(r["correct"]) for r in ok)
            fr = [r["kv_fraction"] for r in ok]
            kept = [r["kept"] for r in ok if r.get("kept")]
            row = {
                "part": "passcode", "variant": variant, "method": VARIANTS.get(variant, ("none", {}))[0],
                "keep": keep, "length": length, "tokens": sum(r["tokens"] for r in recs) / len(recs),
                "n": len(ok), "correct": n_correct, "accuracy": n_correct / len(ok) if ok else None,
                "kv_fraction": sum(fr) / len(fr) if fr else None,
                "kv_saved": 1 - sum(fr) / len(fr) if fr else None,
                "kv_bytes": (sum(r["kv_bytes"] for r in ok) / len(ok)) if ok and ok[0]["kv_bytes"] else None,
                "kept_per_layer": [sum(k[i] for k in kept) / len(kept) for i in range(len(kept[0]))] if kept else None,
                "errors": len(recs) - len(ok), "error": next((r["error"] for r in recs if r["error"]), None),
                "seconds": sum(r["seconds"] for r in recs) / len(recs),
            }
            rows.append(writer.write(row))
    return rows


# ============================================================================ (b) streaming perplexity
def run_ppl(model: Any, tok: Any, cfg: KVBenchConfig, writer: Any) -> list[dict[str, Any]]:
    """StreamingLLM's language-modelling experiment (Xiao et al. 2024, Sec. 4.1): real text streamed through the
    model with the cache held at a fixed budget (``--ppl-budget`` entries per layer, a count keep), the next-token
    NLL of every position. ``ppl_streams`` independent texts run as one batch; tokens enter ``ppl_chunk`` at a
    time (1 = token by token as in the paper; c > 1 evicts after every c tokens, so the cache holds between the
    budget and budget + c - 1 entries while a chunk is processed)."""
    from transformers import DynamicCache

    import tokenreduce as tr

    from ..accounting.kv import kv_bytes
    from ..data.text import english_text

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
        handle = tr.apply(model, name, keep=cfg.ppl_budget, **kw) if name else None
        cache = DynamicCache(config=model.config)
        nll = torch.zeros(S, T)
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                for t in _iter_progress(range(0, T, C), f"ppl {label}"):
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


def _iter_progress(it: Any, desc: str):
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, leave=False, dynamic_ncols=True, mininterval=2.0)


# ============================================================================ (c) timing
class _Stamps:
    """A logits processor that timestamps every generation step: the first call comes right after the prefill
    forward, the next ones after each decoding forward (so one generate() gives both phases). ``tick``: the
    clock (``bench.timing.CLOCKS``: wall or process CPU time)."""

    def __init__(self, tick: Any = time.perf_counter) -> None:
        self.times: list[float] = []
        self.tick = tick

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(self.tick())
        return scores


def _timing_call(model: Any, tok: Any, ids: torch.Tensor, p: dict[str, Any], label: str, T: int,
                 info: dict[str, dict[str, Any]], split: dict[str, list[tuple[float, float]]] | None,
                 clock: str = "wall"):
    """One timed generate() of ``1 + T`` tokens for a candidate; records (prefill s, decode s) in ``split``."""
    from transformers import LogitsProcessorList

    import tokenreduce as tr

    from .timing import CLOCKS

    if label.startswith("kvpress:"):
        return _kvpress_call(model, tok, ids, p, label, T, info, split, clock)
    name, keep, chunk, kw = TIMING_CANDIDATES[label]
    extra = {"prefill_chunk_size": chunk} if chunk else {}
    tick = CLOCKS[clock]

    def fn():
        stamps = _Stamps(tick)
        t0 = tick()
        procs = LogitsProcessorList([stamps])
        if name is None:
            out = _greedy(model, ids, 1 + T, logits_processor=procs, **extra)
        else:
            with tr.apply(model, name, keep=keep, question_len=p["question_len"], **kw) as h:
                out = _greedy(model, ids, 1 + T, logits_processor=procs, **extra)
                info.setdefault(label, {}).update(
                    kv_bytes=h.stats.prefill_kv_bytes, kv_fraction=h.stats.prefill_kept_fraction,
                    kv_bytes_end=h.stats.kv_bytes, kv_fraction_end=h.stats.kv_kept_fraction)
        if split is not None:
            split[label].append((stamps.times[0] - t0, stamps.times[-1] - stamps.times[0]))
            info.setdefault(label, {})["output"] = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        return out

    return fn


KVPRESS_MODES = ("all", "global")


def parse_kvpress_candidate(label: str) -> tuple[str | None, float, str]:
    """``"kvpress:SnapKVPress@0.25"`` -> (press class, keep, mode); ``/global`` = kvpress's Gemma 3 default (sliding
    layers untouched, transformers' config-aware cache), else ``all`` (every layer hooked, the config-less
    cache of kvpress's pipeline). ``"kvpress:none"``: the pipeline's path without a press (its own reference)."""
    if not label.startswith("kvpress:"):
        raise ValueError(f"not a kvpress candidate: {label!r}")
    body, _, mode = label[len("kvpress:"):].partition("/")
    mode = mode or "all"
    if mode not in KVPRESS_MODES:
        raise ValueError(f"kvpress candidate {label!r}: mode must be one of {KVPRESS_MODES}")
    if body == "none":
        return None, 1.0, mode
    press, sep, keep = body.partition("@")
    if not sep or not press:
        raise ValueError(f"kvpress candidate {label!r}: expected kvpress:<Press>@<keep>[/global] or kvpress:none")
    k = float(keep)
    if not 0.0 < k < 1.0:
        raise ValueError(f"kvpress candidate {label!r}: keep must be in (0, 1), got {k}")
    return press, k, mode


def _kvpress_call(model: Any, tok: Any, ids: torch.Tensor, p: dict[str, Any], label: str, T: int,
                  info: dict[str, dict[str, Any]], split: dict[str, list[tuple[float, float]]] | None,
                  clock: str = "wall"):
    """kvpress's own path, timed like ours: the context forward under the press (``press(model)`` hooks), then
    its pipeline's ``generate_answer`` (question forward with logical position ids + greedy tokens), ``1 + T``
    generated tokens. Prefill = the context forward; decode = question + tokens (the question is ~20 tokens).
    kvpress is imported here only (an optional peer: run this in kvpress's venv)."""
    import contextlib

    from transformers import DynamicCache

    from ..accounting.kv import kv_bytes
    from .timing import CLOCKS

    try:
        import kvpress
        from kvpress.pipeline import KVPressTextGenerationPipeline
    except ImportError as e:  # pragma: no cover - depends on the venv
        raise ImportError("kvpress timing candidates need kvpress (its own venv: `make peers`, then run the bench "
                          "with that venv's python after `pip install -e . --no-deps`)") from e
    press_name, keep, mode = parse_kvpress_candidate(label)
    tick = CLOCKS[clock]
    n_ctx = ids.shape[1] - int(p["question_len"])
    ctx, q = ids[:, :n_ctx], ids[:, n_ctx:]
    # its pipeline's own generate_answer, bound to the model and tokenizer (the method reads only these two)
    pipe = types.SimpleNamespace(model=model, tokenizer=tok)
    generate_answer = KVPressTextGenerationPipeline.generate_answer
    press = None if press_name is None else getattr(kvpress, press_name)(compression_ratio=1 - keep)

    def hooks():
        if press is None:
            return contextlib.nullcontext()
        if mode == "all":
            return press(model)
        return kvpress_global_only(press, model)

    def fn():
        cache = DynamicCache(config=model.config) if mode == "global" else DynamicCache()
        with torch.inference_mode():
            t0 = tick()
            with hooks():
                model.model(input_ids=ctx, past_key_values=cache)
            t1 = tick()
            by_prefill = kv_bytes(cache)["tensor"]  # outside both timed phases
            t1b = tick()
            answer = generate_answer(pipe, q, cache, n_ctx, 1 + T)
            t2 = tick()
        info.setdefault(label, {}).update(kv_bytes=by_prefill, kv_bytes_end=kv_bytes(cache)["tensor"])
        if split is not None:
            split[label].append((t1 - t0, t2 - t1b))
            info[label]["output"] = answer
        return answer

    return fn


@contextlib.contextmanager
def kvpress_global_only(press: Any, model: Any):
    """kvpress's ``BasePress.__call__`` with its Gemma3ForConditionalGeneration rule (sliding layers skipped).
    Also used by ``scripts/kvpress_compare.py``."""
    press.post_init_from_model(model)
    hooks = []
    try:
        lm = model.model
        for layer in lm.layers:
            if layer.self_attn.is_sliding:
                continue
            layer.self_attn.rotary_emb = lm.rotary_emb
            hooks.append(layer.self_attn.register_forward_hook(press.forward_hook, with_kwargs=True))
        yield
    finally:
        for h in hooks:
            h.remove()


def _timing_prompt(tok: Any, cfg: KVBenchConfig, length: int) -> tuple[dict[str, Any], torch.Tensor]:
    """The one passcode prompt of ``length`` tokens that the timing and memory parts share, and its ids
    (from ``cfg.timing_prompts``, the export part's JSON, if given: same prompt in a venv without the text)."""
    if cfg.timing_prompts:
        data = json.loads(Path(cfg.timing_prompts).read_text())
        found = [x for x in data.get("timing", []) if x["length"] == length and x.get("seed") == cfg.seed + 7]
        if not found:
            raise ValueError(f"{cfg.timing_prompts} has no timing prompt of length {length} (seed {cfg.seed + 7}); "
                             f"write it with --parts export --timing-lengths {length}")
        p = found[0]
    else:
        p = passcode_prompts(tok, length, 1, seed=cfg.seed + 7)[0]
    ids = tok(p["prompt"], return_tensors="pt").input_ids
    if ids.shape[1] != p["tokens"]:
        raise ValueError(f"the timing prompt has {ids.shape[1]} tokens here, {p['tokens']} where it was exported")
    return p, ids


def _paired(base: list[float], other: list[float]) -> dict[str, float]:
    """Per-round ratios base/other (> 1: ``other`` is faster): median, quartiles, min, max."""
    from .timing import quantile

    r = [b / o for b, o in zip(base, other, strict=True)]
    return {"ratio": quantile(r, 0.5), "q1": quantile(r, 0.25), "q3": quantile(r, 0.75), "min": min(r),
            "max": max(r)}


def _transformers_version() -> str:
    import transformers

    return str(transformers.__version__)


def run_timing(model: Any, tok: Any, cfg: KVBenchConfig, writer: Any) -> list[dict[str, Any]]:
    """Prefill + decode time of each timing candidate against the unreduced model, interleaved in the same
    rounds (order rotated every round). Every ratio is the median of the per-round paired ratios, with its
    quartiles (``*_q1``/``*_q3``) and extremes over the rounds; ``vs_chunked_*`` against the unreduced model with
    the same chunked prefill (when timed). ``cfg.clock="cpu"`` (one thread) times the process's CPU seconds."""
    from ..accounting.memory import peak_memory
    from .timing import Timing, interleaved

    if cfg.clock == "cpu" and cfg.threads != 1:
        raise ValueError(f"clock='cpu' measures one thread's compute and needs threads=1, got threads={cfg.threads}")
    rows = []
    T = cfg.timing_new_tokens
    cands = list(cfg.timing_candidates) + [f"kvpress:{k}" if not k.startswith("kvpress:") else k
                                           for k in cfg.timing_kvpress]
    for c in cands:
        if c.startswith("kvpress:"):
            parse_kvpress_candidate(c)
    for length in cfg.timing_lengths:
        p, ids = _timing_prompt(tok, cfg, length)
        info: dict[str, dict[str, Any]] = {}
        split: dict[str, list[tuple[float, float]]] = {label: [] for label in cands}

        def make(label: str, record: bool = True, ids=ids, p=p, info=info, split=split):
            return _timing_call(model, tok, ids, p, label, T, info, split if record else None, cfg.clock)

        bar = _progress(cfg.repeats, f"timing {length} tok")
        load_before = os.getloadavg()
        t_start = time.time()
        # rotate the order every round (ABC, BCA, ...): on a shared machine a fixed order biases candidates
        res = interleaved({label: make(label) for label in cands}, warmup=1, repeats=cfg.repeats,
                          rotate=True, on_round=lambda i, bar=bar: bar.update(1), clock=cfg.clock)
        load_after = os.getloadavg()
        wall = time.time() - t_start
        bar.close()
        for label in cands:  # drop the warm-up round from the phase splits
            split[label] = split[label][-cfg.repeats:]
        refs = {"": "none", "vs_chunked_": "none + chunked prefill", "vs_kvpress_none_": "kvpress:none"}
        for label in cands:
            tot = res[label]
            pre = [s[0] for s in split[label]]
            dec = [s[1] for s in split[label]]
            tp, td = Timing(pre), Timing(dec)
            row = {"part": "timing", "timing_label": cfg.timing_label, "candidate": label, "length": length,
                   "tokens": ids.shape[1], "transformers": _transformers_version(),
                   "new_tokens": T, "clock": cfg.clock, "threads": cfg.threads, "rounds": cfg.repeats,
                   "loadavg_before": list(load_before), "loadavg_after": list(load_after), "part_wall_s": wall,
                   "prefill_s": tp.median, "prefill_iqr": tp.iqr, "decode_s": td.median, "decode_iqr": td.iqr,
                   "decode_tok_s": T / td.median, "total_s": tot.median, "total_iqr": tot.iqr}
            for prefix, ref in refs.items():
                if ref not in cands:
                    continue
                rpre = [s[0] for s in split[ref]]
                rdec = [s[1] for s in split[ref]]
                for what, a, b in (("total", res[ref].times, tot.times), ("prefill", rpre, pre),
                                   ("decode", rdec, dec)):
                    st = _paired(a, b)
                    row[f"{prefix}speedup_{what}"] = st["ratio"]
                    for k in ("q1", "q3", "min", "max"):
                        row[f"{prefix}speedup_{what}_{k}"] = st[k]
            # the previous report's column names (total speed-up vs the unreduced model, its quartiles)
            if "speedup_total" in row:
                row["speedup_total_low"], row["speedup_total_high"] = row["speedup_total_q1"], row["speedup_total_q3"]
            mem = peak_memory(make(label, record=False)) if cfg.timing_memory else None
            row.update(peak_mem_bytes=mem, **info.get(label, {}), total_times=tot.times, prefill_times=pre,
                       decode_times=dec)
            rows.append(writer.write(row))
    return rows


def run_memory(model: Any, tok: Any, cfg: KVBenchConfig, writer: Any) -> list[dict[str, Any]]:
    """Peak tensor memory and KV bytes of each timing candidate (deterministic, so it need not run inside the
    timing lock): one traced generate() per candidate on the timing prompt."""
    from ..accounting.memory import peak_memory

    rows = []
    T = cfg.timing_new_tokens
    for length in cfg.timing_lengths:
        p, ids = _timing_prompt(tok, cfg, length)
        info: dict[str, dict[str, Any]] = {}
        for label in [*cfg.timing_candidates, *(f"kvpress:{k}" if not k.startswith("kvpress:") else k
                                                for k in cfg.timing_kvpress)]:
            mem = peak_memory(_timing_call(model, tok, ids, p, label, T, info, None, cfg.clock))
            rows.append(writer.write(part="memory", timing_label=cfg.timing_label, candidate=label, length=length,
                                     tokens=ids.shape[1], new_tokens=T, peak_mem_bytes=mem, **info.get(label, {})))
    return rows


# ============================================================================ (d) kvpress side by side
def export_for_kvpress(tok: Any, cfg: KVBenchConfig, path: Path) -> Path:
    """Prompts + the configs both sides run, for ``scripts/kvpress_compare.py`` (runs in kvpress's venv)."""
    prompts = [p for length in cfg.lengths for p in passcode_prompts(tok, length, cfg.n_prompts, cfg.seed)]
    timing = [dict(passcode_prompts(tok, length, 1, seed=cfg.seed + 7)[0], seed=cfg.seed + 7)
              for length in cfg.timing_lengths]
    data = {"prompts": prompts, "timing": timing, "agreement": {k: v["kvpress"] for k, v in AGREEMENT_CONFIGS.items()},
            "agreement_keeps": list(cfg.agreement_keeps), "max_new_tokens": cfg.max_new_tokens,
            "global_layers": None}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def run_agreement(model: Any, tok: Any, cfg: KVBenchConfig, writer: Any) -> list[dict[str, Any]]:
    """Our kept positions for the configurations kvpress shares (context alone, no question, floor budgets)."""
    import tokenreduce as tr

    from ..adapters.llm import capture_prefill, replay_prefill

    rows = []
    prompts = [p for length in cfg.lengths for p in passcode_prompts(tok, length, cfg.n_prompts, cfg.seed)]
    bar = _progress(len(prompts) * len(AGREEMENT_CONFIGS) * len(cfg.agreement_keeps), "kept positions (ours)")
    for p in prompts:
        n_ctx = len(tok(p["context"]).input_ids)  # the prompt's own tokens up to the context boundary
        ids = tok(p["prompt"], return_tensors="pt").input_ids[:, :n_ctx]
        cap = capture_prefill(model, ids)  # one context forward, replayed per configuration (= the real path)
        for label, conf in AGREEMENT_CONFIGS.items():
            name, kw = conf["ours"]
            for keep in cfg.agreement_keeps:
                with tr.apply(model, name, keep=keep, rounding="floor", **kw) as h:
                    cache = replay_prefill(h, cap)
                kept = {}
                for li, layer in enumerate(cache.layers):
                    layer.to_compact()  # a layer with nothing to evict gets its (dense) positions
                    pos = layer.pos[0, 0]
                    kept[li] = sorted(set(pos[pos >= 0].tolist()))
                rows.append(writer.write(part="kept_ours", config=label, keep=keep, prompt=p["id"], kept=kept,
                                         n_layers=len(cache.layers)))
                bar.update(1)
        del cap
    bar.close()
    return rows


def _agreement_rows(ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    idx = {(r["config"], float(r["keep"]), r["prompt"]): r for r in theirs if r.get("kept")}
    acc: dict[tuple[str, float, str], list[float]] = {}
    for r in ours:
        t = idx.get((r["config"], float(r["keep"]), r["prompt"]))
        if t is None:
            continue
        for li, pos in r["kept"].items():
            a, b = set(pos), set(t["kept"].get(str(li), t["kept"].get(li, [])))
            kind = "sliding" if t.get("layer_types", {}).get(str(li), "") == "sliding_attention" else "global"
            if not a and not b:
                continue
            acc.setdefault((r["config"], float(r["keep"]), kind), []).append(len(a & b) / max(len(a | b), 1))
    return [{"part": "agreement", "config": c, "keep": k, "layers": kind, "jaccard_mean": sum(v) / len(v),
             "jaccard_min": min(v), "identical_fraction": sum(x == 1.0 for x in v) / len(v), "n_layer_prompts": len(v)}
            for (c, k, kind), v in sorted(acc.items())]


# ============================================================================ report
_KEYS = {"passcode": ("variant", "keep", "length"), "passcode_sample": ("variant", "keep", "length", "prompt"),
         "ppl": ("variant", "budget", "tokens"), "timing": ("timing_label", "candidate", "length"), "prompts": ("length",),
         "memory": ("timing_label", "candidate", "length"),
         "kept_ours": ("config", "keep", "prompt"), "kvpress_passcode": ("press", "layers", "keep"),
         "kvpress_kept": ("config", "keep", "prompt")}


def _latest(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Rows of every run, per part, the latest run winning for the same configuration (parts and lengths may
    come from separate invocations); ``_meta`` holds the latest main run's metadata (a run labelled for another
    venv, e.g. the kvpress timing, does not replace it)."""
    from .results import read_runs

    parts: dict[str, dict[Any, dict[str, Any]]] = {}
    meta: dict[str, Any] = {}
    if not path.exists():
        return {}
    for m, rows in read_runs(path).values():
        for i, r in enumerate(rows):
            part = r.get("part", "?")
            key = tuple(json.dumps(r.get(k), sort_keys=True) for k in _KEYS[part]) if part in _KEYS else (m["run_id"], i)
            parts.setdefault(part, {})[key] = r
        if (m.get("config") or {}).get("timing_label", "main") == "main" or not meta:
            meta = m  # the header describes the main environment, not a peer venv's timing run
    out = {k: list(v.values()) for k, v in parts.items()}
    out["_meta"] = [meta]
    return out


def merge_results(sources: Sequence[str | Path], dest: str | Path) -> dict[str, int]:
    """Append the runs of several results files (JSONL, one run = a meta line + its rows) to ``dest``, in the
    order given, so the report's later-run-wins rule picks the newest part. A source ``"path@part1+part2"`` keeps
    only those parts' rows (the meta line stays). Runs already in ``dest`` (same ``run_id``) are skipped, so a
    merge can be re-run. Returns ``{"runs": n, "rows": m}`` appended."""
    from .results import read_runs

    dest = Path(dest)
    have = set(read_runs(dest)) if dest.exists() else set()
    lines: list[str] = []
    runs = rows = 0
    for src in sources:
        path_s, _, keep = str(src).partition("@")
        path = Path(path_s)
        if not path.exists():
            raise FileNotFoundError(f"merge: {path} does not exist")
        parts = set(keep.split("+")) if keep else None
        for rid, (meta, rs) in read_runs(path).items():
            if rid in have:
                continue
            sel = [r for r in rs if parts is None or r.get("part") in parts]
            if parts is not None and not sel:
                continue
            have.add(rid)
            lines.append(json.dumps({"type": "meta", **meta}))
            lines += [json.dumps({"type": "row", **r}) for r in sel]
            runs, rows = runs + 1, rows + len(sel)
    if lines:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with dest.open("a", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
    return {"runs": runs, "rows": rows}


def _passcode_summary(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Passcode rows per (variant, keep, length) from the per-prompt samples (the latest sample of each prompt),
    so runs over disjoint prompt ranges, or a run stopped early, still give exact counts (``n`` says how many)."""
    groups: dict[tuple[str, float, int], list[dict[str, Any]]] = {}
    for x in samples:
        groups.setdefault((x["variant"], x["keep"], x["length"]), []).append(x)
    rows = []
    for (variant, keep, length), recs in groups.items():
        ok = [r for r in recs if r.get("error") is None]
        fr = [r["kv_fraction"] for r in ok if r.get("kv_fraction") is not None]
        kb = [r["kv_bytes"] for r in ok if r.get("kv_bytes")]
        rows.append({"part": "passcode", "variant": variant, "keep": keep, "length": length,
                     "method": VARIANTS.get(variant, ("none", {}))[0],
                     "tokens": sum(r["tokens"] for r in recs) / len(recs), "n": len(ok),
                     "correct": sum(bool(r["correct"]) for r in ok),
                     "accuracy": sum(bool(r["correct"]) for r in ok) / len(ok) if ok else None,
                     "kv_fraction": sum(fr) / len(fr) if fr else None, "kv_saved": 1 - sum(fr) / len(fr) if fr else None,
                     "kv_bytes": sum(kb) / len(kb) if kb else None, "errors": len(recs) - len(ok),
                     "replay_checked": sum(r.get("replay_matches_generate") is not None for r in recs),
                     "replay_mismatches": sum(r.get("replay_matches_generate") is False for r in recs)})
    order = {v: i for i, v in enumerate(["none", *VARIANTS])}
    return sorted(rows, key=lambda r: (r["length"], order.get(r["variant"], 99), -r["keep"]))


_TIMING_OLD_COLS = ("candidate", "tokens", "prefill_s", "decode_tok_s", "total_s", "speedup_total", "speedup_total_low",
                    "speedup_total_high", "speedup_prefill", "peak_mem_bytes", "kv_fraction", "kv_bytes",
                    "kv_fraction_end")


def build_report(out: str | Path, kvpress: str | Path | None = None) -> Path:
    from .report import format_table, html_report, pareto_plot

    out = Path(out)
    parts = _latest(out / "kv.jsonl")
    meta = parts.pop("_meta", [{}])[0]
    tables: list[tuple[str, list[dict[str, Any]]]] = []
    images: list[tuple[str, Path]] = []
    samples = parts.get("passcode_sample", [])
    pc = _passcode_summary(samples) or parts.get("passcode", [])
    for r in pc:  # the unreduced cache's bytes (measured by the adapter for the same prompts)
        un = [x["kv_bytes_unreduced"] for x in samples if x.get("kv_bytes_unreduced") and x["length"] == r["length"]
              and x["variant"] == r["variant"] and x["keep"] == r["keep"]]
        if not un:
            un = [x["kv_bytes_unreduced"] for x in samples if x.get("kv_bytes_unreduced") and x["length"] == r["length"]]
        r["kv_bytes_unreduced"] = sum(un) / len(un) if un else None
        if r["variant"] == "none":
            r["kv_bytes"] = r["kv_bytes_unreduced"]
    if pc:
        cols = ["variant", "keep", "length", "tokens", "accuracy", "correct", "n", "kv_fraction", "kv_bytes",
                "kv_bytes_unreduced", "errors", "replay_checked", "replay_mismatches"]
        tables.append(("Passcode retrieval (question kept; kv_fraction = real KV bytes after the prompt / unreduced)",
                       [{c: r.get(c) for c in cols} for r in pc]))
        by_depth: dict[tuple[str, float, int], dict[float, list[bool]]] = {}
        for x in samples:
            if x.get("error") is None and x.get("correct") is not None:
                by_depth.setdefault((x["variant"], x["keep"], x["length"]), {}).setdefault(x["depth"], []).append(
                    bool(x["correct"]))
        if by_depth:
            depths = sorted({d for v in by_depth.values() for d in v})
            tables.append(("Passcode retrieval per depth of the pass key (correct / prompts)",
                           [{"variant": k[0], "keep": k[1], "length": k[2],
                             **{f"depth {d:g}": (f"{sum(v[d])}/{len(v[d])}" if d in v else "-") for d in depths}}
                            for k, v in sorted(by_depth.items(), key=lambda kv: (kv[0][2], kv[0][0] != "none",
                                                                                  kv[0][0], -kv[0][1]))]))
        for length in sorted({r["length"] for r in pc}):
            sub = [dict(r, variant=r["variant"]) for r in pc if r["length"] == length and r.get("accuracy") is not None]
            if sub:
                images.append((f"Passcode accuracy vs KV saved ({length}-token contexts)",
                               pareto_plot(sub, x="kv_saved", y="accuracy", group="variant", label="keep",
                                           path=out / f"passcode_{length}.png", xlabel="KV bytes saved (1 - kept)",
                                           ylabel="passcode accuracy",
                                           title=f"Gemma 3 270M, passcode, {length}-token contexts")))
    pp = parts.get("ppl", [])
    if pp:
        tables.append(("Streaming perplexity (token by token, fixed cache budget per layer)",
                       [{k: r.get(k) for k in ("variant", "budget", "tokens", "streams", "chunk", "ppl", "ppl_past_budget", "ppl_last_segment",
                                               "ppl_segments", "kv_fraction_end", "tokens_per_s")} for r in pp]))
        images.append(("Streaming perplexity per segment", _ppl_plot(pp, out / "ppl.png")))
    tm = parts.get("timing", [])
    for r in tm:
        m = next((x for x in parts.get("memory", []) if x["candidate"] == r["candidate"]
                  and x["length"] == r["length"] and x.get("timing_label") == r.get("timing_label")), None)
        if m is not None and r.get("peak_mem_bytes") is None:  # the memory part (same candidates, untimed)
            r["peak_mem_bytes"] = m["peak_mem_bytes"]
            for k in ("kv_bytes", "kv_fraction", "kv_bytes_end", "kv_fraction_end"):
                if m.get(k) is not None:
                    r[k] = m[k]
    labels = list(dict.fromkeys(r.get("timing_label") for r in tm))
    for label in sorted(labels, key=lambda x: (x is not None, x != "main", labels.index(x))):
        sub = [r for r in tm if r.get("timing_label") == label]
        if label is None:  # rows from before timing labels: wall clock, 3 rounds, load not recorded
            cap = "Timing, earlier run (wall clock, 3 rounds, load not recorded; superseded by the tables below)"
            tables.append((cap, [{k: r.get(k) for k in _TIMING_OLD_COLS} for r in sub]))
            continue
        r0 = sub[0]
        load = [round(x, 2) for r in sub for x in (r.get("loadavg_before") or [])[:1] + (r.get("loadavg_after") or [])[:1]]
        cap = (f"Timing '{label}' vs the unreduced model (same process, interleaved, {r0.get('rounds')} rounds, "
               f"{r0.get('clock')} clock, {r0.get('threads')} thread(s), {r0.get('new_tokens')} new tokens, "
               f"transformers {r0.get('transformers')}, 1-min load {min(load, default=0):g}-{max(load, default=0):g}"
               "; speedups = median of per-round paired ratios [q1, q3])")
        rows = []
        for r in sub:
            row = {k: r.get(k) for k in ("candidate", "tokens", "prefill_s", "decode_tok_s", "total_s")}
            for prefix, name in (("", "vs none"), ("vs_chunked_", "vs none+chunked"),
                                 ("vs_kvpress_none_", "vs kvpress:none")):
                if f"{prefix}speedup_total" not in r:
                    continue
                for what in ("prefill", "decode", "total"):
                    key = f"{prefix}speedup_{what}"
                    row[f"{what} {name}"] = f"{r[key]:.3f} [{r[key + '_q1']:.3f}, {r[key + '_q3']:.3f}]"
            row.update({k: r.get(k) for k in ("peak_mem_bytes", "kv_fraction", "kv_bytes", "kv_bytes_end")})
            rows.append(row)
        tables.append((cap, rows))
    kvp_path = Path(kvpress) if kvpress else out / "kvpress.jsonl"
    if kvp_path.exists():
        kp = _latest(kvp_path)
        kp.pop("_meta", None)
        acc = kp.get("kvpress_passcode", [])
        if acc:
            side = []
            for r in acc:
                ours = next((o for o in pc if o["variant"] == r.get("ours_variant") and
                             abs(o["keep"] - r["keep"]) < 1e-9), None)
                side.append({"method": r["press"], "layers": r["layers"], "keep": r["keep"],
                             "kvpress_accuracy": r["accuracy"], "kvpress_kv_fraction": r["kv_fraction"],
                             "ours_variant": r.get("ours_variant"),
                             "ours_accuracy": ours["accuracy"] if ours else None,
                             "ours_kv_fraction": ours["kv_fraction"] if ours else None,
                             # timed in kvpress_compare.py's own process (1.1k prompts, other load): not comparable
                             # with ours; the same-process comparison is the 'kvpress venv' timing table
                             "kvpress_prefill_s (other process)": r.get("prefill_s"),
                             "kvpress_decode_tok_s (other process)": r.get("decode_tok_s"),
                             "kvpress_error": r.get("error")})
            tables.append(("Side by side with kvpress 0.5.5 (same model, prompts, question kept)", side))
        ag = _agreement_rows(parts.get("kept_ours", []), kp.get("kvpress_kept", []))
        if ag:
            tables.append(("Kept positions, identical configurations (Jaccard of kept sets per layer)", ag))
        kt = kp.get("kvpress_timing", [])
        if kt:
            cap = "kvpress timings (its own process/venv; not comparable, see the 'kvpress venv' timing table)"
            tables.append((cap, kt))
    text = "\n\n".join(format_table(rows, title=cap) for cap, rows in tables if rows)
    (out / "report.txt").write_text(text + "\n")
    return html_report("tokenreduce bench kv — Gemma 3 270M", meta, tables, images, out / "report.html",
                       notes=REPORT_NOTES)


def _ppl_plot(rows: list[dict[str, Any]], path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for r in rows:
        seg = r["segment"]
        xs = [seg * (i + 1) for i in range(len(r["ppl_segments"]))]
        ax.plot(xs, r["ppl_segments"], marker="o", label=f"{r['variant']} ({r['ppl']:.1f})")
    ax.set_yscale("log")
    ax.set_xlabel("tokens streamed")
    ax.set_ylabel(f"perplexity of each {rows[0]['segment']}-token segment")
    ax.set_title(f"Gemma 3 270M, cache budget {next((r['budget'] for r in rows if r['budget']), '-')} per layer")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    return path


# ============================================================================ entry point
def run_kv_bench(cfg: KVBenchConfig) -> Path:
    from .results import ResultWriter
    from .timing import fixed_threads

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    unknown = [v for v in cfg.variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; accepted: {', '.join(VARIANTS)}")
    bad_c = [c for c in cfg.timing_candidates if c not in TIMING_CANDIDATES]
    if bad_c or "none" not in cfg.timing_candidates:
        raise ValueError(f"timing candidates {list(cfg.timing_candidates)}: unknown {bad_c} or 'none' (the reference) "
                         f"missing; accepted: {', '.join(TIMING_CANDIDATES)}")
    if cfg.clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', got {cfg.clock!r}")
    if cfg.clock == "cpu" and cfg.threads != 1:
        raise ValueError(f"clock='cpu' measures one thread's compute and needs threads=1, got threads={cfg.threads}")
    for k in cfg.timing_kvpress:
        parse_kvpress_candidate(k if k.startswith("kvpress:") else f"kvpress:{k}")
    bad = [p for p in cfg.parts if p not in ("passcode", "ppl", "timing", "memory", "agreement", "export")]
    if bad:
        raise ValueError(f"unknown parts {bad}; accepted: passcode, ppl, timing, memory, agreement, export")
    model, tok = _load(cfg)
    with fixed_threads(cfg.threads), ResultWriter(out / "kv.jsonl", extra_meta={"config": cfg.__dict__}) as w:
        if "export" in cfg.parts:
            export_for_kvpress(tok, cfg, out / "kvpress_prompts.json")
        if "passcode" in cfg.parts:
            run_passcode(model, tok, cfg, w)
        if "agreement" in cfg.parts:
            run_agreement(model, tok, cfg, w)
        if "ppl" in cfg.parts:
            run_ppl(model, tok, cfg, w)
        if "timing" in cfg.parts:
            run_timing(model, tok, cfg, w)
        if "memory" in cfg.parts:
            run_memory(model, tok, cfg, w)
    return build_report(out)


def register_cli(bench_app: Any) -> None:
    import typer

    @bench_app.command("kv")
    def kv(
        parts: str = typer.Option("passcode,ppl,timing", help="passcode, ppl, timing, memory, agreement, export"),
        variants: str = typer.Option(",".join(DEFAULT_VARIANTS),
                                     help=f"passcode variants, of: {', '.join(VARIANTS)} (see bench/kv.py VARIANTS)"),
        keeps: str = typer.Option("0.5,0.25,0.1", help="keep values (keep=1 is the unreduced baseline)"),
        baseline: bool = typer.Option(True, help="also run the unreduced model on the passcode prompts"),
        replay: bool = typer.Option(True, help="capture each prompt's forward once and replay it per method"),
        check_replay: int = typer.Option(1, help="prompts on which each cell is re-run with generate() as a check"),
        prompt_range: str = typer.Option("", help="a:b = only passcode prompts a..b-1 of the n (parallel runs)"),
        lengths: str = typer.Option("1100", help="passcode context lengths in tokens"),
        n_prompts: int = typer.Option(8, help="passcode prompts per length"),
        ppl_tokens: int = typer.Option(1536, help="tokens streamed for perplexity"),
        ppl_budget: int = typer.Option(256, help="cache entries per layer for the streaming perplexity"),
        ppl_streams: int = typer.Option(2, help="independent texts streamed as one batch"),
        ppl_chunk: int = typer.Option(8, help="tokens per forward while streaming (1 = token by token)"),
        timing_lengths: str = typer.Option("1024,4096", help="prompt lengths for timing"),
        timing_new_tokens: int = typer.Option(32, help="decoded tokens in the timed generate()"),
        timing_candidates: str = typer.Option(",".join(TIMING_CANDIDATES), help="timed candidates ('none' first)"),
        timing_memory: bool = typer.Option(True, help="peak memory inside the timing part (else: part 'memory')"),
        timing_kvpress: str = typer.Option("", help="kvpress presses timed in the same rounds, e.g. "
                                           "SnapKVPress@0.25,StreamingLLMPress@0.25/global,none (needs kvpress)"),
        timing_prompts: str = typer.Option("", help="timing prompts from this JSON (written by --parts export)"),
        timing_label: str = typer.Option("main", help="name of this timing run (one report table per name)"),
        clock: str = typer.Option("wall", help="wall (elapsed) or cpu (process CPU time; needs --threads 1)"),
        repeats: int = typer.Option(3, help="timed rounds (interleaved)"),
        threads: int = typer.Option(2, help="torch threads"),
        dtype: str = typer.Option("fp32", help="fp32 or bf16"),
        attn: str = typer.Option("sdpa", help="sdpa or eager"),
        out: str = typer.Option("results/kv", help="output directory"),
        quick: bool = typer.Option(False, help="a smoke run: 2 prompts, keep 0.25, short ppl/timing"),
        report_only: bool = typer.Option(False, help="only rebuild the report from <out>/kv.jsonl"),
        merge: str = typer.Option("", help="append the runs of these results files (comma-separated; "
                                           "path@part1+part2 keeps only those parts) to <out>/kv.jsonl first"),
        merge_kvpress: str = typer.Option("", help="the same for <out>/kvpress.jsonl (kvpress_compare.py's files)"),
    ) -> None:
        """KV-cache methods on Gemma 3 270M: passcode retrieval, streaming perplexity, timings (+ kvpress)."""
        split_m = lambda s: [x.strip() for x in s.split(",") if x.strip()]
        for srcs, name in ((merge, "kv.jsonl"), (merge_kvpress, "kvpress.jsonl")):
            if srcs:
                n = merge_results(split_m(srcs), Path(out) / name)
                print(f"merged {n['runs']} runs ({n['rows']} rows) into {Path(out) / name}")
        if report_only:
            print(build_report(out))
            return
        split = lambda s: [x.strip() for x in s.split(",") if x.strip()]
        cfg = KVBenchConfig(parts=split(parts), variants=split(variants), keeps=[float(k) for k in split(keeps)],
                            lengths=[int(x) for x in split(lengths)], n_prompts=n_prompts, ppl_tokens=ppl_tokens,
                            ppl_budget=ppl_budget, ppl_streams=ppl_streams, ppl_chunk=ppl_chunk,
                            timing_lengths=[int(x) for x in split(timing_lengths)],
                            timing_new_tokens=timing_new_tokens, timing_candidates=split(timing_candidates),
                            timing_memory=timing_memory, timing_kvpress=split(timing_kvpress),
                            timing_prompts=timing_prompts or None, clock=clock,
                            timing_label=timing_label,
                            repeats=repeats, threads=threads, dtype=dtype,
                            attn=attn, out=out, baseline=baseline, replay=replay, check_replay=check_replay,
                            prompt_range=tuple(int(x) for x in prompt_range.split(":")) if prompt_range else None)
        if quick:
            cfg.n_prompts, cfg.keeps, cfg.ppl_tokens, cfg.ppl_budget = 2, [0.25], 256, 64
            cfg.timing_lengths, cfg.repeats, cfg.timing_new_tokens = [512], 1, 8
        path = run_kv_bench(cfg)
        print((Path(cfg.out) / "report.txt").read_text())
        print(f"report: {path}")


if __name__ == "__main__":  # `python -m tokenreduce.bench.kv ...`: `bench kv` without the CLI's other plugins
    import typer  # (peer venvs, e.g. kvpress's, lack timm & co.; see the module docstring)

    _app = typer.Typer(add_completion=False)
    register_cli(_app)
    _app()
