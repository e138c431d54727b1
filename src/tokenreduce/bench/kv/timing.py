"""The timing and memory parts: prefill seconds, decode tokens/s, peak tensor memory and KV bytes of each timing
candidate against the unreduced model, interleaved in the same process, also with ``generate()``'s chunked
prefill (then the decoding methods evict between chunks, so prefill attention itself shrinks). Every ratio is
the median of the per-round paired ratios with quartiles and extremes; ``clock="cpu"`` with one thread times
process CPU seconds (robust on a shared machine; the 1-min load average is recorded). kvpress candidates
(``kvpress:...``, :mod:`.kvpress`) run in the same rounds in kvpress's venv."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import torch

from .config import TIMING_CANDIDATES, KVBenchConfig
from .data import timing_prompt
from .kvpress import kvpress_labels, kvpress_timing_call, parse_kvpress_candidate
from .model import greedy, progress

__all__ = ["StepStamps", "check_clock", "paired_stats", "run_memory", "run_timing", "timing_call", "timing_labels"]


class StepStamps:
    """A logits processor that timestamps every generation step: the first call comes right after the prefill
    forward, the next ones after each decoding forward (so one generate() gives both phases). ``tick``: the
    clock (``bench.timing.CLOCKS``: wall or process CPU time)."""

    def __init__(self, tick: Any = time.perf_counter) -> None:
        self.times: list[float] = []
        self.tick = tick

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(self.tick())
        return scores


def timing_call(model: Any, tok: Any, ids: torch.Tensor, p: dict[str, Any], label: str, T: int,
                info: dict[str, dict[str, Any]], split: dict[str, list[tuple[float, float]]] | None,
                clock: str = "wall") -> Callable[[], Any]:
    """One timed generate() of ``1 + T`` tokens for a candidate (a label of ``TIMING_CANDIDATES`` or a kvpress
    candidate); records (prefill s, decode s) in ``split`` and the KV bytes and output in ``info``."""
    from transformers import LogitsProcessorList

    import tokenreduce as tr

    from ..timing import CLOCKS

    if label.startswith("kvpress:"):
        return kvpress_timing_call(model, tok, ids, p, label, T, info, split, clock)
    name, keep, chunk, kw = TIMING_CANDIDATES[label]
    extra = {"prefill_chunk_size": chunk} if chunk else {}
    tick = CLOCKS[clock]

    def fn():
        stamps = StepStamps(tick)
        t0 = tick()
        procs = LogitsProcessorList([stamps])
        if name is None:
            out = greedy(model, ids, 1 + T, logits_processor=procs, **extra)
        else:
            with tr.apply(model, name, keep=keep, question_len=p["question_len"], **kw) as h:
                out = greedy(model, ids, 1 + T, logits_processor=procs, **extra)
                info.setdefault(label, {}).update(
                    kv_bytes=h.stats.prefill_kv_bytes, kv_fraction=h.stats.prefill_kept_fraction,
                    kv_bytes_end=h.stats.kv_bytes, kv_fraction_end=h.stats.kv_kept_fraction,
                    keep_achieved=h.stats.keep_achieved)
        if split is not None:
            split[label].append((stamps.times[0] - t0, stamps.times[-1] - stamps.times[0]))
            info.setdefault(label, {})["output"] = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        return out

    return fn


def paired_stats(base: list[float], other: list[float]) -> dict[str, float]:
    """Per-round ratios base/other (> 1: ``other`` is faster): median, quartiles, min, max."""
    from ..timing import paired_ratios, quantile

    r = paired_ratios(base, other)
    return {"ratio": quantile(r, 0.5), "q1": quantile(r, 0.25), "q3": quantile(r, 0.75), "min": min(r),
            "max": max(r)}


def check_clock(cfg: KVBenchConfig) -> None:
    """The CPU clock measures one thread's compute: ``clock="cpu"`` needs ``threads=1``."""
    if cfg.clock == "cpu" and cfg.threads != 1:
        raise ValueError(f"clock='cpu' measures one thread's compute and needs threads=1, got threads={cfg.threads}")


def timing_labels(cfg: KVBenchConfig) -> list[str]:
    """The timed candidates: ``cfg.timing_candidates``, then the kvpress presses of ``cfg.timing_kvpress`` as
    ``kvpress:`` labels (every kvpress label is parsed, so a bad one fails before anything runs)."""
    cands = [*cfg.timing_candidates, *kvpress_labels(cfg.timing_kvpress)]
    for c in cands:
        if c.startswith("kvpress:"):
            parse_kvpress_candidate(c)
    return cands


def _transformers_version() -> str:
    import transformers

    return str(transformers.__version__)


def run_timing(model: Any, tok: Any, cfg: KVBenchConfig, writer: Any) -> list[dict[str, Any]]:
    """Prefill + decode time of each timing candidate against the unreduced model, interleaved in the same
    rounds (order rotated every round). Every ratio is the median of the per-round paired ratios, with its
    quartiles (``*_q1``/``*_q3``) and extremes over the rounds; ``vs_chunked_*`` against the unreduced model with
    the same chunked prefill (when timed). ``cfg.clock="cpu"`` (one thread) times the process's CPU seconds."""
    from ...accounting.memory import peak_memory
    from ..timing import Timing, interleaved

    check_clock(cfg)
    rows = []
    T = cfg.timing_new_tokens
    cands = timing_labels(cfg)
    for length in cfg.timing_lengths:
        p, ids = timing_prompt(tok, cfg, length)
        info: dict[str, dict[str, Any]] = {}
        split: dict[str, list[tuple[float, float]]] = {label: [] for label in cands}

        def make(label: str, record: bool = True, ids=ids, p=p, info=info, split=split):
            return timing_call(model, tok, ids, p, label, T, info, split if record else None, cfg.clock)

        bar = progress(f"timing {length} tok", total=cfg.repeats)
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
            pd = [a + b for a, b in split[label]]  # the request without setup: prefill + decode
            tp, td, tpd = Timing(pre), Timing(dec), Timing(pd)
            row = {"part": "timing", "timing_label": cfg.timing_label, "candidate": label, "length": length,
                   "tokens": ids.shape[1], "transformers": _transformers_version(),
                   "new_tokens": T, "clock": cfg.clock, "threads": cfg.threads, "rounds": cfg.repeats,
                   "loadavg_before": list(load_before), "loadavg_after": list(load_after), "part_wall_s": wall,
                   "prefill_s": tp.median, "prefill_iqr": tp.iqr, "decode_s": td.median, "decode_iqr": td.iqr,
                   "decode_tok_s": T / td.median, "pd_s": tpd.median, "pd_iqr": tpd.iqr, "pd_min": min(pd),
                   "pd_max": max(pd), "total_s": tot.median, "total_iqr": tot.iqr}
            for prefix, ref in refs.items():
                if ref not in cands:
                    continue
                rpre = [s[0] for s in split[ref]]
                rdec = [s[1] for s in split[ref]]
                rpd = [a + b for a, b in split[ref]]
                for what, a, b in (("total", res[ref].times, tot.times), ("prefill", rpre, pre),
                                   ("decode", rdec, dec), ("pd", rpd, pd)):
                    st = paired_stats(a, b)
                    row[f"{prefix}speedup_{what}"] = st["ratio"]
                    for k in ("q1", "q3", "min", "max"):
                        row[f"{prefix}speedup_{what}_{k}"] = st[k]
            # the previous report's column names (total speed-up vs the unreduced model, its quartiles)
            if "speedup_total" in row:
                row["speedup_total_low"], row["speedup_total_high"] = row["speedup_total_q1"], row["speedup_total_q3"]
            mem = peak_memory(make(label, record=False)) if cfg.timing_memory else None
            row.update(peak_mem_bytes=mem, **info.get(label, {}), total_times=tot.times, prefill_times=pre,
                       decode_times=dec, pd_times=pd)
            rows.append(writer.write(row))
    return rows


def run_memory(model: Any, tok: Any, cfg: KVBenchConfig, writer: Any) -> list[dict[str, Any]]:
    """Peak tensor memory and KV bytes of each timing candidate (deterministic, so it need not run alone on the
    machine like the timing part): one traced generate() per candidate on the timing prompt."""
    from ...accounting.memory import peak_memory

    rows = []
    T = cfg.timing_new_tokens
    for length in cfg.timing_lengths:
        p, ids = timing_prompt(tok, cfg, length)
        info: dict[str, dict[str, Any]] = {}
        for label in timing_labels(cfg):
            mem = peak_memory(timing_call(model, tok, ids, p, label, T, info, None, cfg.clock))
            rows.append(writer.write(part="memory", timing_label=cfg.timing_label, candidate=label, length=length,
                                     tokens=ids.shape[1], new_tokens=T, peak_mem_bytes=mem, **info.get(label, {})))
    return rows

