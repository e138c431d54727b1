"""`bench kv` as a sweep: the parts cut into cells (:func:`kv_sweep`).

* ``prompts``: one cell per length (the prompts, for the report);
* ``passcode``: one cell per (length, prompt): the prompt's forward is captured once and replayed for every
  variant x keep (so adding a variant recomputes these cells); the ``passcode`` rows per (variant, keep) are
  derived from all sample rows after the sweep;
* ``agreement``: one cell per length; ``ppl``: one cell per streamed variant; ``memory``: one per length;
* ``timing``: one timing cell per length, every candidate interleaved in its rounds (alone on its node).

Each cell's settings hold only the configuration fields its part reads (:data:`PART_FIELDS`), so changing,
say, the timing rounds leaves the passcode cells finished.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from ..sweep import CachedLoader, Cell, Sweep
from .config import PPL_VARIANTS, KVBenchConfig

__all__ = ["PART_FIELDS", "SMOKE", "RowList", "kv_sweep", "load_kv_context", "run_kv_cell", "sweep_model_name"]

_MODEL = ("dtype", "attn", "threads")
#: the configuration fields each part's cells depend on
PART_FIELDS: dict[str, tuple[str, ...]] = {
    "prompts": ("n_prompts", "seed"),
    "passcode": ("variants", "keeps", "n_prompts", "max_new_tokens", "baseline", "replay", "check_replay", "seed",
                 *_MODEL),
    "agreement": ("agreement_keeps", "n_prompts", "seed", *_MODEL),
    "ppl": ("ppl_tokens", "ppl_budget", "ppl_segment", "ppl_streams", "ppl_chunk", *_MODEL),
    "timing": ("timing_new_tokens", "timing_candidates", "timing_memory", "timing_kvpress", "timing_prompts",
               "timing_label", "clock", "repeats", "seed", *_MODEL),
    "memory": ("timing_new_tokens", "timing_candidates", "timing_kvpress", "timing_prompts", "timing_label", "clock",
               "seed", *_MODEL),
}

#: ``--smoke``: a tiny random-weight Gemma 3 over all-MiniLM-L6-v2's tokenizer, every part on short prompts
SMOKE: dict[str, Any] = {
    "parts": ["passcode", "agreement", "ppl", "timing", "memory"], "variants": ["streaming-llm", "snapkv", "h2o"],
    "keeps": [0.5], "lengths": [128], "n_prompts": 2, "max_new_tokens": 4, "agreement_keeps": [0.5],
    "ppl_tokens": 64, "ppl_budget": 16, "ppl_segment": 16, "ppl_streams": 1, "ppl_chunk": 8,
    "timing_lengths": [128], "timing_new_tokens": 4, "repeats": 1, "threads": 1,
    "timing_candidates": ["none", "knorm@0.25", "streaming-llm@0.25 + chunked"], "timing_memory": False,
}


class RowList(list):
    """A results writer for one cell: ``write`` keeps the row (the harness writes the cell's rows)."""

    def write(self, row: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
        record = {**(row or {}), **fields}
        self.append(record)
        return record


def load_kv_context(name: str, dtype: str, attn: str) -> tuple[Any, Any]:
    """Gemma 3 270M (:func:`.model.load_model`) or the smoke model (``"smoke"``) and the tokenizer."""
    from ..smoke import SMOKE_MODEL, smoke_causal_lm
    from .model import load_model

    if name == SMOKE_MODEL:
        return smoke_causal_lm()
    return load_model(KVBenchConfig(dtype=dtype, attn=attn))


def run_kv_cell(ctx: tuple[Any, Any], cell: Cell) -> list[dict[str, Any]]:
    """The rows of one cell of ``bench kv`` (its part in ``cell.settings["part"]``)."""
    from ..timing import fixed_threads
    from .agreement import run_agreement
    from .data import passcode_prompts
    from .passcode import run_passcode_prompt
    from .ppl import run_ppl
    from .timing import run_memory, run_timing

    model, tok = ctx
    s = cell.settings
    cfg = KVBenchConfig(**s["config"])
    part, length = s["part"], s.get("length")
    rows = RowList()
    with fixed_threads(cfg.threads):
        if part == "prompts":
            rows.write(part="prompts", length=length, prompts=passcode_prompts(tok, length, cfg.n_prompts, cfg.seed))
        elif part == "passcode":
            p = passcode_prompts(tok, length, cfg.n_prompts, cfg.seed)[cell.shard]
            rows += run_passcode_prompt(model, tok, cfg, p, cell.shard)
        elif part == "agreement":
            run_agreement(model, tok, dataclasses.replace(cfg, lengths=[length]), rows)
        elif part == "ppl":
            run_ppl(model, tok, cfg, rows, labels=[cell.method])
        elif part == "timing":
            run_timing(model, tok, dataclasses.replace(cfg, timing_lengths=[length]), rows)
        elif part == "memory":
            run_memory(model, tok, dataclasses.replace(cfg, timing_lengths=[length]), rows)
        else:
            raise ValueError(f"unknown part {part!r}; accepted: {', '.join(PART_FIELDS)}")
    return list(rows)


def _settings(cfg: KVBenchConfig, part: str, **extra: Any) -> dict[str, Any]:
    fields = {f: getattr(cfg, f) for f in PART_FIELDS[part]}
    return {"part": part, "config": {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}, **extra}


def _derive(cfg: KVBenchConfig, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``passcode`` rows per (variant, keep, length) from every finished sample row."""
    from .passcode import passcode_summary

    samples = [r for r in rows if r.get("part") == "passcode_sample"]
    return [r for length in cfg.lengths for r in passcode_summary(cfg, length, samples)]


def sweep_model_name(smoke: bool) -> str:
    from ..smoke import cell_model

    return cell_model(smoke, False, lambda: "gemma3-270m")


def kv_sweep(cfg: KVBenchConfig, smoke: bool = False) -> Sweep:
    """The cells of ``cfg.parts`` (the export part runs in the driver), the loader and the cell function."""
    from .passcode import passcode_indices

    name = sweep_model_name(smoke)
    cells: list[Cell] = []
    if "passcode" in cfg.parts:
        for length in cfg.lengths:
            cells.append(Cell("kv", name, "prompts", None, _settings(cfg, "prompts", length=length)))
            cells += [Cell("kv", name, "passcode", tuple(cfg.keeps), _settings(cfg, "passcode", length=length), shard=i)
                      for i in passcode_indices(cfg)]
    if "agreement" in cfg.parts:
        cells += [Cell("kv", name, "agreement", tuple(cfg.agreement_keeps), _settings(cfg, "agreement", length=length))
                  for length in cfg.lengths]
    if "ppl" in cfg.parts:
        cells += [Cell("kv", name, label, None, _settings(cfg, "ppl")) for label in PPL_VARIANTS]
    for part in ("timing", "memory"):
        if part in cfg.parts:
            cells += [Cell("kv", name, part, None, _settings(cfg, part, length=length), timing=part == "timing")
                      for length in cfg.timing_lengths]
    load = CachedLoader(functools.partial(load_kv_context, dtype=cfg.dtype, attn=cfg.attn))
    return Sweep("kv", cells, load, run_kv_cell, meta={"bench": "kv", "config": cfg.__dict__},
                 cpus_per_cell=float(cfg.threads or 1), derive=functools.partial(_derive, cfg))
