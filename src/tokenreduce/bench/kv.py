"""`tokenreduce bench kv`: KV-cache methods on the real Gemma 3 270M (CPU), in one process per part:

* **passcode** — retrieval of a 5-digit pass key hidden at several depths in real English filler (Lee corpus),
  contexts of ``--lengths`` tokens; the question is kept uncompressed (``question_len``); accuracy per
  method x keep with the *real* KV kept (bytes of the cache tensors right after the prompt / the unreduced
  cache's bytes) and the kept entries per layer;
* **ppl** — perplexity of real text streamed token by token past a fixed cache budget (StreamingLLM's
  experiment): the full cache, window attention (no sinks), StreamingLLM, H2O, TOVA;
* **timing** — prefill seconds, decode tokens/s, peak tensor memory and KV bytes against the unreduced model,
  interleaved in the same process (``--timing-lengths``), also with generate()'s chunked prefill;
* **kvpress** — side by side with NVIDIA kvpress 0.5.5 (its own venv; ``scripts/kvpress_compare.py`` reads the
  prompts this bench exports and writes ``kvpress.jsonl``): accuracies, timings, and agreement of the kept
  positions for identically configured methods (ours with ``rounding="floor"`` like kvpress's ``int(n k)``).

Results: ``<out>/kv.jsonl`` (one run per invocation, with metadata), ``<out>/*.png`` and ``<out>/report.html``.
"""

from __future__ import annotations

import json
import math
import os
import time
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
    "5.2 builds for a multi-token forward on a compressed cache.")


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
                            if cap is not None:
                                out = _replay_greedy(model, h, cap, cfg.max_new_tokens)
                            else:
                                out = _greedy(model, ids, cfg.max_new_tokens)
                            st = h.stats
                        rec.update(kv_fraction=st.prefill_kept_fraction, kv_bytes=st.prefill_kv_bytes,
                                   kv_bytes_unreduced=st.prefill_kv_bytes_unreduced,
                                   kept=[k[0] for k in st.prefill_kept], replayed=cap is not None)
                        if cap is not None and pi < cfg.check_replay:  # the real path must give the same tokens
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

    from ..adapters.llm import kv_bytes
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
    forward, the next ones after each decoding forward (so one generate() gives both phases)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores


def _timing_call(model: Any, tok: Any, ids: torch.Tensor, p: dict[str, Any], label: str, T: int,
                 info: dict[str, dict[str, Any]], split: dict[str, list[tuple[float, float]]] | None):
    """One timed generate() of ``1 + T`` tokens for a candidate; records (prefill s, decode s) in ``split``."""
    from transformers import LogitsProcessorList

    import tokenreduce as tr

    name, keep, chunk, kw = TIMING_CANDIDATES[label]
    extra = {"prefill_chunk_size": chunk} if chunk else {}

    def fn():
        stamps = _Stamps()
        t0 = time.perf_counter()
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


def _timing_prompt(tok: Any, cfg: KVBenchConfig, length: int) -> tuple[dict[str, Any], torch.Tensor]:
    """The one passcode prompt of ``length`` tokens that the timing and memory parts share, and its ids."""
    p = passcode_prompts(tok, length, 1, seed=cfg.seed + 7)[0]
    return p, tok(p["prompt"], return_tensors="pt").input_ids


def run_timing(model: Any, tok: Any, cfg: KVBenchConfig, writer: Any) -> list[dict[str, Any]]:
    """Prefill + decode wall-clock of each timing candidate against the unreduced model, interleaved."""
    from .memory import peak_memory
    from .timing import Timing, interleaved, speedup

    rows = []
    T = cfg.timing_new_tokens
    for length in cfg.timing_lengths:
        p, ids = _timing_prompt(tok, cfg, length)
        info: dict[str, dict[str, Any]] = {}
        cands = list(cfg.timing_candidates)
        split: dict[str, list[tuple[float, float]]] = {label: [] for label in cands}

        def make(label: str, record: bool = True, ids=ids, p=p, info=info, split=split):
            return _timing_call(model, tok, ids, p, label, T, info, split if record else None)

        bar = _progress(cfg.repeats, f"timing {length} tok")
        # rotate the order every round (ABC, BCA, ...): on a shared machine a fixed order biases candidates
        res = interleaved({label: make(label) for label in cands}, warmup=1, repeats=cfg.repeats,
                          rotate=True, on_round=lambda i, bar=bar: bar.update(1))
        bar.close()
        for label in cands:  # drop the warm-up round from the phase splits
            split[label] = split[label][-cfg.repeats:]
        base, base_pre = res["none"], Timing([s[0] for s in split["none"]])
        for label in cands:
            tot = res[label]
            pre = Timing([s[0] for s in split[label]])
            dec = Timing([s[1] for s in split[label]])
            sp = speedup(base, tot, paired=True)
            spp = speedup(base_pre, pre, paired=True)
            mem = peak_memory(make(label, record=False)) if cfg.timing_memory else None
            row = {"part": "timing", "candidate": label, "length": length, "tokens": ids.shape[1],
                   "new_tokens": T, "prefill_s": pre.median, "prefill_iqr": pre.iqr, "decode_s": dec.median,
                   "decode_tok_s": T / dec.median, "total_s": tot.median, "total_iqr": tot.iqr,
                   "speedup_total": sp.ratio, "speedup_total_low": sp.low, "speedup_total_high": sp.high,
                   "speedup_prefill": spp.ratio, "peak_mem_bytes": mem, **info.get(label, {}),
                   "total_times": tot.times, "prefill_times": pre.times, "decode_times": dec.times}
            rows.append(writer.write(row))
    return rows


def run_memory(model: Any, tok: Any, cfg: KVBenchConfig, writer: Any) -> list[dict[str, Any]]:
    """Peak tensor memory and KV bytes of each timing candidate (deterministic, so it need not run inside the
    timing lock): one traced generate() per candidate on the timing prompt."""
    from .memory import peak_memory

    rows = []
    T = cfg.timing_new_tokens
    for length in cfg.timing_lengths:
        p, ids = _timing_prompt(tok, cfg, length)
        info: dict[str, dict[str, Any]] = {}
        for label in cfg.timing_candidates:
            mem = peak_memory(_timing_call(model, tok, ids, p, label, T, info, None))
            rows.append(writer.write(part="memory", candidate=label, length=length, tokens=ids.shape[1],
                                     peak_mem_bytes=mem, **info.get(label, {})))
    return rows


# ============================================================================ (d) kvpress side by side
def export_for_kvpress(tok: Any, cfg: KVBenchConfig, path: Path) -> Path:
    """Prompts + the configs both sides run, for ``scripts/kvpress_compare.py`` (runs in kvpress's venv)."""
    prompts = [p for length in cfg.lengths for p in passcode_prompts(tok, length, cfg.n_prompts, cfg.seed)]
    data = {"prompts": prompts, "agreement": {k: v["kvpress"] for k, v in AGREEMENT_CONFIGS.items()},
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
         "ppl": ("variant", "budget", "tokens"), "timing": ("candidate", "length"), "prompts": ("length",),
         "memory": ("candidate", "length"),
         "kept_ours": ("config", "keep", "prompt"), "kvpress_passcode": ("press", "layers", "keep"),
         "kvpress_kept": ("config", "keep", "prompt")}


def _latest(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Rows of every run, per part, the latest run winning for the same configuration (parts and lengths may
    come from separate invocations); ``_meta`` holds the latest run's metadata."""
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
        meta = m
    out = {k: list(v.values()) for k, v in parts.items()}
    out["_meta"] = [meta]
    return out


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
                  and x["length"] == r["length"]), None)
        if m is not None and r.get("peak_mem_bytes") is None:
            r["peak_mem_bytes"] = m["peak_mem_bytes"]
            for k in ("kv_bytes", "kv_fraction", "kv_fraction_end"):
                r.setdefault(k, m.get(k))
    if tm:
        tables.append(("Timing vs the unreduced model (same process, interleaved; medians)",
                       [{k: r.get(k) for k in ("candidate", "tokens", "prefill_s", "decode_tok_s", "total_s",
                                               "speedup_total", "speedup_total_low", "speedup_total_high",
                                               "speedup_prefill", "peak_mem_bytes", "kv_fraction", "kv_bytes",
                                               "kv_fraction_end")}
                        for r in tm]))
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
                             "kvpress_prefill_s": r.get("prefill_s"), "kvpress_decode_tok_s": r.get("decode_tok_s"),
                             "kvpress_error": r.get("error")})
            tables.append(("Side by side with kvpress 0.5.5 (same model, prompts, question kept)", side))
        ag = _agreement_rows(parts.get("kept_ours", []), kp.get("kvpress_kept", []))
        if ag:
            tables.append(("Kept positions, identical configurations (Jaccard of kept sets per layer)", ag))
        kt = kp.get("kvpress_timing", [])
        if kt:
            tables.append(("kvpress timings (its own process/venv)", kt))
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
        repeats: int = typer.Option(3, help="timed rounds (interleaved)"),
        threads: int = typer.Option(2, help="torch threads"),
        dtype: str = typer.Option("fp32", help="fp32 or bf16"),
        attn: str = typer.Option("sdpa", help="sdpa or eager"),
        out: str = typer.Option("results/kv", help="output directory"),
        quick: bool = typer.Option(False, help="a smoke run: 2 prompts, keep 0.25, short ppl/timing"),
        report_only: bool = typer.Option(False, help="only rebuild the report from <out>/kv.jsonl"),
    ) -> None:
        """KV-cache methods on Gemma 3 270M: passcode retrieval, streaming perplexity, timings (+ kvpress)."""
        if report_only:
            print(build_report(out))
            return
        split = lambda s: [x.strip() for x in s.split(",") if x.strip()]
        cfg = KVBenchConfig(parts=split(parts), variants=split(variants), keeps=[float(k) for k in split(keeps)],
                            lengths=[int(x) for x in split(lengths)], n_prompts=n_prompts, ppl_tokens=ppl_tokens,
                            ppl_budget=ppl_budget, ppl_streams=ppl_streams, ppl_chunk=ppl_chunk,
                            timing_lengths=[int(x) for x in split(timing_lengths)],
                            timing_new_tokens=timing_new_tokens, timing_candidates=split(timing_candidates),
                            timing_memory=timing_memory,
                            repeats=repeats, threads=threads, dtype=dtype,
                            attn=attn, out=out, baseline=baseline, replay=replay, check_replay=check_replay,
                            prompt_range=tuple(int(x) for x in prompt_range.split(":")) if prompt_range else None)
        if quick:
            cfg.n_prompts, cfg.keeps, cfg.ppl_tokens, cfg.ppl_budget = 2, [0.25], 256, 64
            cfg.timing_lengths, cfg.repeats, cfg.timing_new_tokens = [512], 1, 8
        path = run_kv_bench(cfg)
        print((Path(cfg.out) / "report.txt").read_text())
        print(f"report: {path}")
