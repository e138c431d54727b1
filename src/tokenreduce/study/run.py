"""``run_study``: one study end to end: its configuration, the check for cached models, the sweep (every item's
row into ``<out>/items.jsonl``, resumable), the analysis and the report."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..bench.sweep import finished_cells, run_sweep, without_metadata
from .registry import Study, StudyResult, get_study
from .report import write_report

__all__ = ["StudyRun", "default_out", "run_study"]


@dataclass
class StudyRun:
    study: Study
    config: Any
    result: StudyResult
    rows: list[dict[str, Any]]
    paths: dict[str, Path]


def default_out(name: str, smoke: bool) -> Path:
    return Path("results/study") / name / ("smoke" if smoke else "")


def run_study(name: str, smoke: bool = False, out: str | Path | None = None,
              overrides: Mapping[str, Any] | None = None, executor: str = "local", address: str | None = None,
              resume: bool = True, progress: bool = True, report_only: bool = False) -> StudyRun:
    """Run study ``name`` (``smoke``: tiny random-weight models) with ``overrides`` of its configuration.
    Raises FileNotFoundError naming the build command when a cached model is missing (before anything runs).
    ``report_only``: run nothing, analyse the grid's cells already finished in ``<out>/items.jsonl`` (a run
    still going, or stopped: the report says how many cells it holds)."""
    study = get_study(name)
    cfg = study.make_config(smoke, overrides)
    if not smoke:
        missing = study.missing_models(cfg)
        if missing:
            raise FileNotFoundError(f"study {name} needs: " + "; ".join(missing))
    out = Path(out) if out is not None else default_out(name, smoke)
    sweep = study.sweep(cfg, smoke)
    if report_only:
        done = finished_cells(out / "items.jsonl")
        rows = without_metadata([r for c in sweep.cells for r in done.get(c.id, [])])
        have = sum(c.id in done for c in sweep.cells)
        meta: dict[str, Any] = {"report_only": True, "cells": len(sweep.cells), "finished_cells": have}
    else:
        res = run_sweep(sweep, out / "items.jsonl", executor=executor, address=address, resume=resume,
                        progress=progress)
        rows, meta = without_metadata(res.rows), res.meta
    result = study.analyse(rows, cfg)
    if report_only and have < len(sweep.cells):
        result.notes.insert(0, f"partial: the report holds {have} of the {len(sweep.cells)} cells of this grid "
                               f"(--report-only on an unfinished run)")
    paths = write_report(study, result, cfg, meta, out, smoke)
    return StudyRun(study, cfg, result, rows, {"items": out / "items.jsonl", **paths})
