"""One `bench kv` invocation: check the configuration, load the model, run the chosen parts into
``<out>/kv.jsonl`` (one run, with metadata) and rebuild the report."""

from __future__ import annotations

from pathlib import Path

from ..args import check_choice, parse_keeps
from ..results import ResultWriter
from ..timing import fixed_threads
from .agreement import run_agreement
from .config import PARTS, TIMING_CANDIDATES, VARIANTS, KVBenchConfig
from .data import export_for_kvpress
from .model import load_model
from .passcode import run_passcode
from .ppl import run_ppl
from .report import build_report
from .timing import check_clock, run_memory, run_timing, timing_labels

__all__ = ["check_config", "run_kv_bench"]


def check_config(cfg: KVBenchConfig) -> None:
    """Every error of ``cfg`` that can be found before the model is loaded (names, clock and threads)."""
    unknown = [v for v in cfg.variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; accepted: {', '.join(VARIANTS)}")
    bad_c = [c for c in cfg.timing_candidates if c not in TIMING_CANDIDATES]
    if bad_c or "none" not in cfg.timing_candidates:
        raise ValueError(f"timing candidates {list(cfg.timing_candidates)}: unknown {bad_c} or 'none' (the reference) "
                         f"missing; accepted: {', '.join(TIMING_CANDIDATES)}")
    if cfg.clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', got {cfg.clock!r}")
    check_clock(cfg)
    timing_labels(cfg)  # parses the kvpress candidates
    bad = [p for p in cfg.parts if p not in PARTS]
    if bad:
        raise ValueError(f"unknown parts {bad}; accepted: {', '.join(PARTS)}")
    parse_keeps(cfg.keeps, "keeps")
    check_choice(cfg.dtype, ("fp32", "bf16"), "dtype")
    check_choice(cfg.attn, ("sdpa", "eager"), "attn")
    for name, values in (("lengths", cfg.lengths), ("timing_lengths", cfg.timing_lengths)):
        if any(not isinstance(v, int) or v < 50 for v in values):
            raise ValueError(f"{name} must be token counts >= 50, got {list(values)}")


def run_kv_bench(cfg: KVBenchConfig) -> Path:
    """Run ``cfg.parts`` (in the order export, passcode, agreement, ppl, timing, memory) and build the report;
    returns the HTML report's path."""
    check_config(cfg)  # before anything is created, loaded or written
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(cfg)
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
