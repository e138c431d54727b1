"""``run_study``: one study end to end: its configuration, the check for cached models, the sweep (every item's
row into ``<out>/items.jsonl``, resumable), the analysis and the report."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..bench.sweep import run_sweep, without_metadata
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
              resume: bool = True, progress: bool = True) -> StudyRun:
    """Run study ``name`` (``smoke``: tiny random-weight models) with ``overrides`` of its configuration.
    Raises FileNotFoundError naming the build command when a cached model is missing (before anything runs)."""
    study = get_study(name)
    cfg = study.make_config(smoke, overrides)
    if not smoke:
        missing = study.missing_models(cfg)
        if missing:
            raise FileNotFoundError(f"study {name} needs: " + "; ".join(missing))
    out = Path(out) if out is not None else default_out(name, smoke)
    sweep = study.sweep(cfg, smoke)
    res = run_sweep(sweep, out / "items.jsonl", executor=executor, address=address, resume=resume,
                    progress=progress)
    rows = without_metadata(res.rows)
    result = study.analyse(rows, cfg)
    paths = write_report(study, result, cfg, res.meta, out, smoke)
    return StudyRun(study, cfg, result, rows, {"items": out / "items.jsonl", **paths})
