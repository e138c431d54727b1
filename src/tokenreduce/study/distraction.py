"""The ``distraction`` study: does query-aware reduction help a small LM retrieve past distractors?

**Hypothesis** (stated before the run). On Gemma 3 270M, pass-key prompts hold two labelled keys (the question
asks for one) and look-alike numbers in real filler (:mod:`tokenreduce.data.distraction`), the asked key at depths
swept over the context, at several lengths. Query-aware reduction -- KV-cache methods that score entries by the
question's attention (SnapKV and PyramidKV with the question as observation window, GemFilter on the question)
and question-aware prompt compression (LongLLMLingua, extractive) -- raises retrieval accuracy over the unreduced
model at keep 0.5 and 0.25, because it drops the filler and distractors that mislead the small model.

**Test.** Per length, every condition is paired with the unreduced model on the same prompts: accuracy with a
Wilson 95% CI, the difference with a paired-bootstrap 95% CI (10,000 resamples, seed 0), the exact McNemar test;
Holm's adjustment over the query-aware family (StreamingLLM is a non-query-aware reference, reported, not in the
hypothesis). *Supported*: some query-aware condition significantly better (Holm p < 0.05) and none significantly
worse; *mixed*: some better, some worse; *not supported*: none better. No verdict when a condition has fewer
prompts than a 95% Wilson CI of half-width 0.15 needs (39). Accuracy per depth is reported as a further table.

**Second part: coherence past the window.** Real text streamed token by token past a fixed cache (StreamingLLM's
experiment, :func:`tokenreduce.bench.kv.run_ppl`), to 5x the cache budget: hypothesis, StreamingLLM's perplexity
on the tokens past the budget stays within 10% of the full cache's (non-inferiority: the upper 95% bound of the
perplexity ratio, paired bootstrap over 64-token segments, below 1.10).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from ..bench.sweep import CachedLoader, Cell, Sweep
from .analysis import BASELINE, Hypothesis, Metric, compare, decide
from .registry import Part, Study, StudyResult

__all__ = ["STUDY", "DistractionConfig", "DistractionStudy", "distraction_prompts", "run_distraction_cell"]

PPL_BASE = "full cache"


@dataclass
class DistractionConfig:
    """Defaults: the full size of issue 19 (1k/2k/4k tokens, 64 prompts per length)."""

    lengths: tuple[int, ...] = (1024, 2048, 4096)
    n_prompts: int = 64
    depths: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    similar: int = 4
    kv_variants: tuple[str, ...] = ("snapkv-q-max9", "pyramidkv-q", "gemfilter-q-max9", "streaming-llm")
    prompt_methods: tuple[str, ...] = ("longllmlingua", "extractive")
    keeps: tuple[float, ...] = (0.5, 0.25)
    max_new_tokens: int = 7
    ppl: bool = True
    ppl_variants: tuple[str, ...] = ("full cache", "window (no sinks)", "streaming-llm", "h2o", "tova")
    ppl_budget: int = 256
    ppl_tokens: int = 1280
    ppl_segment: int = 64
    ppl_streams: int = 2
    ppl_chunk: int = 8
    ppl_margin: float = 0.10
    threads: int = 1
    seed: int = 0
    max_halfwidth: float = 0.15


def _query_aware_kv(label: str) -> bool:
    from ..bench.kv.config import VARIANTS

    return str(VARIANTS[label][1].get("preset", "")).startswith("question")


def _query_aware_prompt(method: str) -> bool:
    from ..registry import get_method

    return bool(getattr(get_method(method, "prompt").cls, "needs_question", False))


def distraction_prompts(tok: Any, length: int, cfg: DistractionConfig) -> list[dict[str, Any]]:
    """The prompts of one length as the KV bench's prompt dicts (plus the distractor fields)."""
    from ..data.distraction import make_distraction_samples
    from ..pipelines import question_length

    samples = make_distraction_samples(cfg.n_prompts, length, lambda s: len(tok(s).input_ids), cfg.depths,
                                       cfg.similar, cfg.seed)
    out = []
    for i, s in enumerate(samples):
        out.append({"id": f"{length}-{i}", "sample": s, "prompt": s.prompt, "context": s.context,
                    "question": s.question, "answer": s.answer, "depth": s.depth, "length": length,
                    "tokens": len(tok(s.prompt).input_ids),
                    "question_len": question_length(tok, s.context, s.prompt)})
    return out


def _item(p: dict[str, Any], method: str, keep: float, family: str, query_aware: bool, output: str | None,
          error: str | None, **extra: Any) -> dict[str, Any]:
    s = p["sample"]
    scores = s.score(output) if output is not None else {"correct": None, "distracted": None, "look_alike": None}
    return {"part": "item", "length": p["length"], "item": p["id"], "depth": s.depth,
            "distractor_depth": s.distractor_depth, "target": s.target_label, "tokens": p["tokens"],
            "method": method, "keep": keep, "family": family, "query_aware": query_aware, **scores,
            "output": output, "error": error, **extra}


def _kv_items(model: Any, tok: Any, cfg: DistractionConfig, p: dict[str, Any], pi: int) -> list[dict[str, Any]]:
    """The unreduced model and every KV variant x keep on one prompt (one prefill, replayed: bench kv's
    :func:`~tokenreduce.bench.kv.passcode.run_passcode_prompt`)."""
    from ..bench.kv.config import KVBenchConfig
    from ..bench.kv.passcode import run_passcode_prompt

    kv = KVBenchConfig(variants=cfg.kv_variants, keeps=cfg.keeps, max_new_tokens=cfg.max_new_tokens,
                       threads=cfg.threads, check_replay=0, seed=cfg.seed)
    out = []
    for r in run_passcode_prompt(model, tok, kv, {k: v for k, v in p.items() if k != "sample"}, pi):
        base = r["variant"] == "none"
        out.append(_item(p, BASELINE if base else r["variant"], r["keep"], "none" if base else "kv",
                         False if base else _query_aware_kv(r["variant"]), r["output"], r["error"],
                         kv_fraction=r.get("kv_fraction"), seconds=r["seconds"]))
    return out


def _prompt_items(model: Any, tok: Any, cfg: DistractionConfig, p: dict[str, Any]) -> list[dict[str, Any]]:
    """Every prompt-compression method x keep: the context compressed (question-aware methods see the
    question), then the question and answer prefix appended uncompressed, greedy answer."""
    import time

    import tokenreduce as tr

    from ..bench.kv.model import greedy

    s = p["sample"]
    out = []
    for m in cfg.prompt_methods:
        for keep in cfg.keeps:
            t0 = time.perf_counter()
            try:
                res = tr.compress(s.context, method=m, keep=keep, lm=model, tokenizer=tok, question=s.question)
                ids = tok(f"{res.text}\n{s.question}\n{s.answer_prefix}", return_tensors="pt").input_ids
                gen = greedy(model, ids, cfg.max_new_tokens)
                text, err, kept = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True), None, res.kept_ratio
            except (ValueError, TypeError) as e:
                text, err, kept = None, str(e), None
            out.append(_item(p, f"prompt:{m}", keep, "prompt", _query_aware_prompt(m), text, err,
                             kept_ratio=kept, seconds=time.perf_counter() - t0))
    return out


def _ppl_items(model: Any, tok: Any, cfg: DistractionConfig, label: str) -> list[dict[str, Any]]:
    """bench kv's streaming perplexity of one variant, as one row per segment past the budget (the items the
    CI resamples) plus the variant's summary row."""
    from ..bench.kv.config import KVBenchConfig
    from ..bench.kv.ppl import run_ppl
    from ..bench.kv.sweep import RowList

    kv = KVBenchConfig(ppl_tokens=cfg.ppl_tokens, ppl_budget=cfg.ppl_budget, ppl_segment=cfg.ppl_segment,
                       ppl_streams=cfg.ppl_streams, ppl_chunk=cfg.ppl_chunk, threads=cfg.threads)
    rows = RowList()
    (row,) = run_ppl(model, tok, kv, rows, labels=[label])
    method = BASELINE if label == PPL_BASE else label
    seg = row["segment"]
    items = [{"part": "ppl_segment", "method": method, "keep": cfg.ppl_budget, "item": i, "start": i * seg,
              "nll": math.log(v)} for i, v in enumerate(row["ppl_segments"]) if i * seg >= cfg.ppl_budget]
    return [{**row, "part": "ppl", "method": method}, *items]


def run_distraction_cell(ctx: tuple[Any, Any], cell: Cell) -> list[dict[str, Any]]:
    from ..bench.timing import fixed_threads

    model, tok = ctx
    cfg = DistractionConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cell.settings["config"].items()})
    with fixed_threads(cfg.threads):
        if cell.method == "prompt":
            length = cell.settings["length"]
            p = distraction_prompts(tok, length, cfg)[cell.shard]
            return _kv_items(model, tok, cfg, p, cell.shard) + _prompt_items(model, tok, cfg, p)
        return _ppl_items(model, tok, cfg, cell.method)


_ITEM_FIELDS = ("n_prompts", "depths", "similar", "kv_variants", "prompt_methods", "keeps", "max_new_tokens",
                "threads", "seed")
_PPL_FIELDS = ("ppl_budget", "ppl_tokens", "ppl_segment", "ppl_streams", "ppl_chunk", "threads")


def _settings(cfg: DistractionConfig, names: tuple[str, ...], **extra: Any) -> dict[str, Any]:
    return {"config": {k: getattr(cfg, k) for k in names}, **extra}


class DistractionStudy(Study):
    __doc__ = __doc__
    name = "distraction"
    config = DistractionConfig
    smoke: ClassVar[dict[str, Any]] = {"lengths": (160,), "n_prompts": 4, "kv_variants": ("snapkv-q-max9", "streaming-llm"),
             "prompt_methods": ("extractive",), "keeps": (0.5,), "max_new_tokens": 4, "ppl_variants":
             ("full cache", "streaming-llm"), "ppl_budget": 16, "ppl_tokens": 80, "ppl_segment": 16,
             "ppl_streams": 1, "ppl_chunk": 8}

    def missing_models(self, cfg: DistractionConfig) -> list[str]:
        from ..models.gemma import gemma_cache_ready

        return [] if gemma_cache_ready() else ["Gemma 3 270M is not cached: build it with `tokenreduce convert gemma`"]

    def sweep(self, cfg: DistractionConfig, smoke: bool) -> Sweep:
        from ..bench.kv.config import PPL_VARIANTS, VARIANTS
        from ..bench.kv.sweep import load_kv_context, sweep_model_name

        bad = [v for v in cfg.kv_variants if v not in VARIANTS] + [v for v in cfg.ppl_variants if v not in PPL_VARIANTS]
        if bad:
            raise ValueError(f"unknown variants {bad}; KV: {', '.join(VARIANTS)}; ppl: {', '.join(PPL_VARIANTS)}")
        for m in cfg.prompt_methods:
            _query_aware_prompt(m)  # an unknown method fails here, before the model loads
        name = sweep_model_name(smoke)
        cells = [Cell("study/distraction", name, "prompt", tuple(cfg.keeps), _settings(cfg, _ITEM_FIELDS, length=n),
                      shard=i) for n in cfg.lengths for i in range(cfg.n_prompts)]
        if cfg.ppl:
            cells += [Cell("study/distraction", name, v, cfg.ppl_budget, _settings(cfg, _PPL_FIELDS))
                      for v in cfg.ppl_variants]
        load = CachedLoader(functools.partial(load_kv_context, dtype="fp32", attn="sdpa"))
        return Sweep("study/distraction", cells, load, run_distraction_cell,
                     meta={"bench": "study/distraction", "study": self.name}, cpus_per_cell=float(cfg.threads))

    def analyse(self, rows: list[dict[str, Any]], cfg: DistractionConfig) -> StudyResult:
        items = [r for r in rows if r.get("part") == "item"]
        acc = Hypothesis(
            "query-aware reduction (KV: question-window SnapKV/PyramidKV/GemFilter; prompt: question-aware "
            "compression) at keep 0.5 and 0.25 raises pass-key accuracy with a labelled distractor key and "
            "look-alike numbers over the unreduced Gemma 3 270M",
            "per length, paired with the unreduced model on the same prompts: Wilson 95% CI, paired-bootstrap CI "
            "of the difference, exact McNemar test, Holm over the query-aware family",
            Metric("correct", "proportion", True, "accuracy"), treated=_is_query_aware,
            max_halfwidth=cfg.max_halfwidth)
        table = compare(items, acc.metric, strata=("length",), seed=cfg.seed)
        parts = [Part("retrieval with distractors", acc, table, decide(table, acc, ("length",)), ("length",))]
        distracted = compare(items, Metric("distracted", "proportion", False, "distractor answered"),
                             strata=("length",), seed=cfg.seed)
        by_depth = compare(items, Metric("correct", "proportion", True, "accuracy"), strata=("length", "depth"),
                           seed=cfg.seed)
        tables = [("how often the distractor key was answered instead (per length)", _short(distracted)),
                  ("accuracy per depth of the asked key (lost in the middle)", _short(by_depth))]
        notes: list[str] = []
        segs = [r for r in rows if r.get("part") == "ppl_segment"]
        if segs:
            ppl = Hypothesis(
                f"StreamingLLM keeps perplexity on the tokens past a {cfg.ppl_budget}-entry cache (text streamed to "
                f"{cfg.ppl_tokens // cfg.ppl_budget}x the budget) within {cfg.ppl_margin:.0%} of the full cache's",
                f"paired bootstrap over {cfg.ppl_segment}-token segments of the mean NLL difference; non-inferior "
                f"when the upper 95% bound of the perplexity ratio is below {1 + cfg.ppl_margin:.2f}",
                Metric("nll", "mean", False, "segment NLL"), treated=lambda r: r["method"] == "streaming-llm",
                margin=math.log(1 + cfg.ppl_margin), min_items=10)
            t2 = compare(segs, ppl.metric, seed=cfg.seed)
            for r in t2:
                r["ppl"] = math.exp(r[ppl.metric.name])
                if "diff" in r:
                    r.update(ppl_ratio=math.exp(r["diff"]), ratio_low=math.exp(r["diff_low"]),
                             ratio_high=math.exp(r["diff_high"]))
            parts.append(Part("coherence past the window", ppl, t2, decide(t2, ppl)))
            tables.append(("streaming perplexity (all tokens, and past the budget)",
                           [{k: r.get(k) for k in ("variant", "method", "budget", "tokens", "streams", "chunk", "ppl",
                                                   "ppl_past_budget", "ppl_last_segment", "kv_fraction_end",
                                                   "seconds")} for r in rows if r.get("part") == "ppl"]))
        errors = [r for r in items if r.get("error")]
        if errors:
            notes.append(f"{len(errors)} item(s) failed (left out of both sides of their pairs), e.g. "
                         f"{errors[0]['method']}@{errors[0]['keep']}: {errors[0]['error']}")
        return StudyResult(parts, tables, notes)


def _is_query_aware(r: dict[str, Any]) -> bool:
    m = r["method"]
    if m.startswith("prompt:"):
        return _query_aware_prompt(m.split(":", 1)[1])
    return m != BASELINE and _query_aware_kv(m)


def _short(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keep = ("length", "depth", "method", "keep", "n", "accuracy", "distractor answered", "ci_low", "ci_high",
            "diff", "diff_low", "diff_high", "p")
    return [{k: r[k] for k in keep if k in r} for r in table]


STUDY = DistractionStudy()
