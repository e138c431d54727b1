"""`tokenreduce demo`: real results on real models within minutes of a fresh virtualenv.

Three short runs on the pretrained models that install as packages (no training):

* **KV cache** (Gemma 3 270M, converted once from its GGUF package, about a minute): pass-key retrieval
  from real news filler, the question kept; the unreduced cache against SnapKV (preset question-max9: the
  question as observation window, max pooling), TOVA and StreamingLLM at keep 0.25 (a quarter of the KV
  cache kept): answers right, KV bytes kept, seconds per prompt;
* **prompt compression** (Gemma 3 270M as reader): Selective Context (question-agnostic, Gemma as scorer) and
  extractive (question-aware, MiniLM relevance) at keep 0.5 of the context: answers right, tokens kept,
  compression and answer seconds;
* **sentence embeddings** (all-MiniLM-L6-v2): ToMe, EViT, pooling and random at keep 0.75 of the token-block
  work: Spearman correlation with the human similarity judgements of the 50 Lee documents, and cosine to
  the unreduced embeddings.

It ends with the tables and the path of the HTML report. ``--full`` is the long benchmark of the vision methods
on the reference ViT, which trains once first (announced with its duration before it starts).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["run_demo"]

KV_METHODS: dict[str, dict[str, Any]] = {"snapkv": {"preset": "question-max9"}, "tova": {}, "streaming-llm": {}}
PROMPT_METHODS = ("selective-context", "extractive")
ENCODER_METHODS = ("tome", "evit", "pool", "random")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _bar(total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False)


def _answer(model: Any, tok: Any, prompt: str, n: int = 7, apply: Callable[[], Any] | None = None,
            question_len: int = 0) -> tuple[str, float, Any]:
    """Greedy continuation of ``prompt`` (under a tr.apply handle made by ``apply(question_len)`` if given)."""
    ids = tok(prompt, return_tensors="pt")
    t0 = time.perf_counter()
    with torch.inference_mode():
        if apply is None:
            out, stats = model.generate(**ids, max_new_tokens=n, do_sample=False), None
        else:
            with apply(question_len) as h:
                out = model.generate(**ids, max_new_tokens=n, do_sample=False)
            stats = h.stats
    text = tok.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
    return text, time.perf_counter() - t0, stats


def _unreduced(model: Any, tok: Any, samples: list[Any]) -> list[tuple[str, float]]:
    """The unreduced model's answer and seconds per prompt (the reference row of both LLM parts)."""
    _answer(model, tok, samples[0].prompt)  # warm-up: the first generate() of a process is slower
    return [_answer(model, tok, s.prompt)[:2] for s in samples]


def _kv_part(model: Any, tok: Any, samples: list[Any], keep: float, base: list[tuple[str, float]]
             ) -> list[dict[str, Any]]:
    import tokenreduce as tr

    rows = [{"part": "kv-cache", "method": "none", "keep": 1.0,
             "accuracy": sum(s.correct(t) for s, (t, _) in zip(samples, base)) / len(samples), "kv_kept": 1.0,
             "seconds_per_prompt": statistics.median(sec for _, sec in base), "n": len(samples)}]
    bar = _bar(len(samples) * len(KV_METHODS), "KV cache (Gemma 3 270M)")
    for name, kw in KV_METHODS.items():
        right, secs, kept = 0, [], []
        for s in samples:
            ql = tr.question_length(tok, s.context, s.prompt)
            text, sec, st = _answer(model, tok, s.prompt, question_len=ql,
                                    apply=lambda q, name=name, kw=kw: tr.apply(model, name, keep=keep, question_len=q,
                                                                               **kw))
            right += s.correct(text)
            secs.append(sec)
            kept.append(st.prefill_kv_bytes / max(1, st.prefill_kv_bytes_unreduced))
            bar.update(1)
        rows.append({"part": "kv-cache", "method": name, "keep": keep, "accuracy": right / len(samples),
                     "kv_kept": statistics.mean(kept), "seconds_per_prompt": statistics.median(secs),
                     "n": len(samples)})
    bar.close()
    return rows


def _prompt_part(model: Any, tok: Any, samples: list[Any], keep: float, base: list[tuple[str, float]]
                 ) -> list[dict[str, Any]]:
    import tokenreduce as tr

    rows = [{"part": "prompt", "method": "none", "keep": 1.0,
             "accuracy": sum(s.correct(t) for s, (t, _) in zip(samples, base)) / len(samples), "tokens_kept": 1.0,
             "compress_seconds": 0.0, "answer_seconds": statistics.median(sec for _, sec in base),
             "request_seconds": statistics.median(sec for _, sec in base), "request_speedup": 1.0,
             "n": len(samples)}]
    bar = _bar(len(samples) * len(PROMPT_METHODS), "prompt compression")
    for name in PROMPT_METHODS:
        right, comp, ans, ratio, speedup = 0, [], [], [], []
        for s, (_, base_sec) in zip(samples, base):
            res = tr.compress(s.context, method=name, keep=keep, lm=model, tokenizer=tok,
                              question=s.question if name == "extractive" else None)
            text, a_sec, _ = _answer(model, tok, f"{res.text}\n{s.question}\n{s.answer_prefix}")
            right += s.correct(text)
            comp.append(res.timings["total"])
            ans.append(a_sec)
            ratio.append(res.kept_ratio)
            speedup.append(base_sec / (res.timings["total"] + a_sec))
            bar.update(1)
        rows.append({"part": "prompt", "method": name, "keep": keep, "accuracy": right / len(samples),
                     "tokens_kept": statistics.mean(ratio), "compress_seconds": statistics.median(comp),
                     "answer_seconds": statistics.median(ans),
                     "request_seconds": statistics.median(c + a for c, a in zip(comp, ans)),
                     "request_speedup": statistics.median(speedup), "n": len(samples)})
    bar.close()
    return rows


def _encoder_part(keep: float) -> list[dict[str, Any]]:
    import numpy as np
    import torch.nn.functional as F
    from scipy.stats import spearmanr

    import tokenreduce as tr
    from tokenreduce.adapters.minilm import load_minilm
    from tokenreduce.data.text import lee_similarity_matrix, lee_test_documents

    model, tok = load_minilm()
    docs, human = list(lee_test_documents()), np.asarray(lee_similarity_matrix())
    enc = tok(docs, padding=True, truncation=True, max_length=256, return_tensors="pt")
    iu = np.triu_indices(len(docs), k=1)

    def embed(method: str | None) -> tuple[torch.Tensor, float, float]:
        t0 = time.perf_counter()
        with torch.inference_mode():
            if method is None:
                out = model(**enc).last_hidden_state
                e, achieved = tr.mean_pool(None, out, enc["attention_mask"]), 1.0
            else:
                with tr.apply(model, method, keep=keep) as h:
                    e, achieved = tr.mean_pool(h, model(**enc).last_hidden_state), h.stats.keep_achieved
        return F.normalize(e, dim=-1), achieved, time.perf_counter() - t0

    base, _, base_sec = embed(None)
    rows = []
    for name in ("none", *ENCODER_METHODS):
        e, achieved, sec = (base, 1.0, base_sec) if name == "none" else embed(name)
        sim = (e @ e.T).numpy()
        rows.append({"part": "encoder", "method": name, "keep": 1.0 if name == "none" else keep,
                     "keep_achieved": achieved, "spearman_vs_human": float(spearmanr(sim[iu], human[iu]).statistic),
                     "cosine_to_unreduced": float((e * base).sum(-1).mean()), "seconds": sec})
    return rows


def run_demo(out: str = "results/demo", n_prompts: int = 4, context_tokens: int = 500, kv_keep: float = 0.25,
             prompt_keep: float = 0.5, encoder_keep: float = 0.75) -> Path:
    """Run the three parts (see the module docstring); returns the HTML report's path."""
    from tokenreduce.data.passcode import make_passcode_samples
    from tokenreduce.models.gemma import gemma_cache_ready, load_gemma

    from .report import format_table, html_report
    from .results import ResultWriter
    from .timing import fixed_threads

    t_start = time.perf_counter()
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    if not gemma_cache_ready():
        _log("converting Gemma 3 270M from its GGUF package once (about a minute on 2 cores) ...")
    model, tok = load_gemma(convert_if_missing=True)
    samples = make_passcode_samples(n_prompts, context_tokens,
                                    lambda s: len(tok(s, add_special_tokens=False).input_ids), seed=0)
    tables: list[tuple[str, list[dict[str, Any]]]] = []
    with fixed_threads(torch.get_num_threads()), ResultWriter(outdir / "results.jsonl",
                                                              extra_meta={"bench": "demo"}) as writer:
        base = _unreduced(model, tok, samples)
        parts = (
            (f"KV cache, Gemma 3 270M: pass-key retrieval at ~{context_tokens} tokens, keep {kv_keep} of the KV entries",
             lambda: _kv_part(model, tok, samples, kv_keep, base)),
            (f"prompt compression, Gemma 3 270M: keep {prompt_keep} of the context's tokens",
             lambda: _prompt_part(model, tok, samples, prompt_keep, base)),
            (f"sentence embeddings, all-MiniLM-L6-v2: keep {encoder_keep} of the token-block work, 50 Lee documents",
             lambda: _encoder_part(encoder_keep)),
        )
        for title, part in parts:
            rows = part()
            for r in rows:
                writer.write(r)
            tables.append((title, rows))
            print(format_table(rows, [c for c in rows[0] if c != "part"], title=title), flush=True)
        meta = writer.meta
    report = html_report("tokenreduce demo: real models, measured here", meta, tables, [], outdir / "report.html",
                         notes="Accuracy: the 5-digit pass key appears in the 7 greedy tokens after 'The pass key "
                               "is'. kv_kept: KV-cache bytes after the prompt / the unreduced cache's. Timings: "
                               "median seconds per prompt on this machine, one process. Prompt compression: "
                               "request = compression + answer; request_speedup = median over prompts of the "
                               "uncompressed request's seconds / this method's (> 1: the whole request is faster).")
    print(f"\nreport: {report.resolve()}  ({time.perf_counter() - t_start:.0f} s)")
    return report
