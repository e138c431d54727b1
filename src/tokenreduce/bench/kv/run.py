"""One `bench kv` invocation: check the configuration, run the chosen parts' cells into ``<out>/kv.jsonl`` (one
run, with metadata; cells already there are skipped) and rebuild the report."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..args import check_choice, parse_keeps
from ..sweep import run_sweep
from .config import PARTS, TIMING_CANDIDATES, VARIANTS, KVBenchConfig
from .data import export_for_kvpress
from .report import build_report
from .sweep import kv_sweep, sweep_model_name
from .timing import check_clock, timing_labels
from .venv import check_kvpress_here, check_kvpress_python, run_compare_in_kvpress_venv, run_timing_in_kvpress_venv

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
    timed_here = any(p in cfg.parts for p in ("timing", "memory")) and not cfg.kvpress_python
    if cfg.timing_kvpress and timed_here:
        check_kvpress_here()
    if cfg.kvpress_python and not cfg.timing_kvpress and any(p in cfg.parts for p in ("timing", "memory")):
        raise ValueError("--kvpress-python runs the timing part in kvpress's venv with its presses: give them with "
                         "--timing-kvpress, e.g. none,SnapKVPress@0.25")
    if cfg.kvpress_python:
        check_kvpress_python(cfg)
    bad = [p for p in cfg.parts if p not in PARTS]
    if bad:
        raise ValueError(f"unknown parts {bad}; accepted: {', '.join(PARTS)}")
    parse_keeps(cfg.keeps, "keeps")
    check_choice(cfg.dtype, ("fp32", "bf16"), "dtype")
    check_choice(cfg.attn, ("sdpa", "eager"), "attn")
    for name, values in (("lengths", cfg.lengths), ("timing_lengths", cfg.timing_lengths)):
        if any(not isinstance(v, int) or v < 50 for v in values):
            raise ValueError(f"{name} must be token counts >= 50, got {list(values)}")


def run_kv_bench(cfg: KVBenchConfig, smoke: bool = False, executor: str = "local", address: str | None = None,
                 resume: bool = True, progress: bool = True) -> Path:
    """Run ``cfg.parts`` (in the order export, passcode, agreement, ppl, timing, memory) as a sweep
    (:mod:`.sweep`: ``executor`` "local" or "ray", ``resume`` skips the cells already in ``<out>/kv.jsonl``)
    and build the report; returns the HTML report's path. ``smoke``: a tiny random-weight Gemma 3 (the
    settings of ``cfg``, e.g. :data:`.sweep.SMOKE`)."""
    check_config(cfg)  # before anything is created, loaded or written
    if cfg.kvpress_python and smoke:
        raise ValueError("--kvpress-python times the real Gemma 3 270M in kvpress's venv; it has no --smoke model")
    if not smoke:
        from ...models.gemma import gemma_cache_dir, gemma_cache_ready
        from ...models.gemma.cache import missing_cache_message

        if not gemma_cache_ready():
            raise FileNotFoundError(missing_cache_message(gemma_cache_dir()))
    out = Path(cfg.out)
    venv_parts = [p for p in ("timing", "memory") if p in cfg.parts] if cfg.kvpress_python else []
    compare = bool(cfg.kvpress_python) and any(p in cfg.parts for p in ("passcode", "agreement"))
    sweep = kv_sweep(dataclasses.replace(cfg, parts=[p for p in cfg.parts if p not in venv_parts]), smoke)
    if "export" in cfg.parts or compare:
        out.mkdir(parents=True, exist_ok=True)
        export_for_kvpress(sweep.load(sweep_model_name(smoke))[1], cfg, out / "kvpress_prompts.json")
    if sweep.cells:
        run_sweep(sweep, out / "kv.jsonl", executor=executor, address=address, resume=resume, progress=progress)
    if compare:  # kvpress's passcode accuracies / kept positions on the same prompts (.venv)
        run_compare_in_kvpress_venv(cfg, out / "kvpress_prompts.json", resume)
    if venv_parts:  # ours and kvpress's presses in the same rounds, in kvpress's venv (.venv)
        run_timing_in_kvpress_venv(dataclasses.replace(cfg, parts=venv_parts), sweep.load(sweep_model_name(smoke))[1])
    return build_report(out)
