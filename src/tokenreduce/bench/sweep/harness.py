"""The sweep harness: a benchmark's grid of cells -> one JSONL results file, resumable.

:func:`run_sweep` skips the cells whose rows are already in the results file (any earlier run: a crash, an
interrupted run, a method added to the grid), runs the others with an executor (``local``: in this process;
``ray``: on a Ray cluster), writes each cell's rows as soon as it finishes (a crash loses only the cells
running), and returns the rows of the whole grid in grid order for the benchmark's report.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..meta import environment
from ..results import ResultWriter, read_runs
from .cell import Cell
from .executors import make_executor
from .spec import Rows, Sweep

__all__ = ["Sweep", "SweepResult", "finished_cells", "run_sweep"]

@dataclass
class SweepResult:
    """The rows of every cell of the grid (grid order, without ``type``/``run_id``), what ran, and the run's
    header (``meta``: the environment of the driver plus the sweep's extras)."""

    rows: Rows
    cells: int
    ran: int
    resumed: int
    failed: int
    meta: dict[str, Any]
    path: Path
    derived: Rows = field(default_factory=list)

    def summary(self) -> str:
        failed = f"{self.failed} failed (error rows; a rerun retries them)" if self.failed else "0 failed"
        return (f"{self.meta.get('bench', 'sweep')} sweep: {self.cells} cells, {self.ran} run, {self.resumed} from "
                f"earlier runs, {failed}; rows in {self.path}")


def _strip(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in ("type", "run_id")}


def finished_cells(path: str | Path) -> dict[str, Rows]:
    """``{cell_id: rows}`` of the cells with complete rows in a results file (the latest run of a cell wins;
    a cell whose rows are incomplete or that failed is not finished)."""
    path = Path(path)
    if not path.is_file():
        return {}
    by: dict[str, dict[str, Rows]] = {}
    for rid, (_, rows) in read_runs(path).items():
        for r in rows:
            if r.get("cell_id"):
                by.setdefault(r["cell_id"], {}).setdefault(rid, []).append(_strip(r))
    out: dict[str, Rows] = {}
    for cid, runs in by.items():
        rows = list(runs.values())[-1]
        want = (rows[0].get("origin") or {}).get("cell_rows", len(rows))
        if len(rows) == want and not any(r.get("cell_failed") for r in rows):
            out[cid] = rows
    return out


def _with_given(cell: Cell, done: dict[str, Rows], path: Path) -> Cell:
    """``cell`` with the rows of the cells it needs (all must be finished in ``path``)."""
    if not cell.needs:
        return cell
    missing = [i for i in cell.needs if i not in done]
    if missing:
        raise FileNotFoundError(f"{cell!r} needs the rows of {len(missing)} cell(s) that are not in {path} "
                                f"(e.g. {missing[0]}): run the part that computes them first")
    return dataclasses.replace(cell, given=tuple(r for i in cell.needs for r in done[i]))


def run_sweep(sweep: Sweep, path: str | Path, executor: str = "local", address: str | None = None,
              resume: bool = True, progress: bool = True) -> SweepResult:
    """Run the cells of ``sweep`` missing from ``path`` (all of them with ``resume=False``) and return the
    rows of the whole grid. ``executor``: ``"local"`` (in this process) or ``"ray"`` (``address``: an existing
    cluster, else a local one). A cell that raises gives an error row and the sweep goes on;
    KeyboardInterrupt stops it, with every finished cell's rows on disk."""
    path = Path(path)
    ids = [c.id for c in sweep.cells]
    if len(set(ids)) != len(ids):
        dup = next(c for c in sweep.cells if ids.count(c.id) > 1)
        raise ValueError(f"the {sweep.bench} grid holds {dup!r} twice")
    prior = finished_cells(path)
    done = prior if resume else {}
    todo = [_with_given(c, prior, path) for c in sweep.cells if c.id not in done]
    meta: dict[str, Any] = {**environment(), **sweep.meta,
                            "sweep": {"executor": executor, "address": address, "cells": len(sweep.cells),
                                      "run": len(todo), "resumed": len(sweep.cells) - len(todo)}}
    rows_by: dict[str, Rows] = {c.id: done[c.id] for c in sweep.cells if c.id in done}
    failed = 0
    derived: Rows = []
    if todo:
        runner = make_executor(executor, address)  # before anything is written: Ray missing or unreachable
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=f"{sweep.bench} sweep ({executor})", disable=not progress)
        with ResultWriter(path, meta=meta) as writer:
            meta = writer.meta | {"run_id": writer.run_id}

            def finished(cell: Cell, rows: Rows) -> None:
                nonlocal failed
                rows_by[cell.id] = [_strip(writer.write(r)) for r in rows]
                failed += any(r.get("cell_failed") for r in rows)
                bar.update(1)

            try:
                runner.run(sweep, todo, finished)
            finally:
                bar.close()
            if sweep.derive is not None:
                derived = [_strip(writer.write(r)) for r in
                           sweep.derive([r for c in sweep.cells for r in rows_by.get(c.id, [])])]
    rows = [r for c in sweep.cells for r in rows_by.get(c.id, [])]
    if not todo and sweep.derive is not None:
        derived = sweep.derive(rows)
    result = SweepResult(rows, len(sweep.cells), len(todo), len(sweep.cells) - len(todo), failed, meta, path,
                         derived)
    if progress or failed:
        print(result.summary(), file=sys.stderr, flush=True)
    return result

