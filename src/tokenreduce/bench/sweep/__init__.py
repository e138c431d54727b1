"""Benchmarks as sweeps: a grid of pure cells (:class:`Cell`, a stable hashed id each), run by an executor
(``local`` in this process, ``ray`` on a Ray cluster), resumable from the results file (:func:`run_sweep`).
docs/sweeps.md shows how to run one on a cluster."""

from __future__ import annotations

from .cell import Cell, canonical_json
from .executors import EXECUTORS, LocalExecutor, make_executor
from .grid import PARTS, budget_tuple, method_cells
from .harness import SweepResult, finished_cells, run_sweep
from .runner import METADATA_FIELDS, CachedLoader, CellRunner, error_row, without_metadata
from .spec import Sweep

__all__ = [
    "EXECUTORS",
    "METADATA_FIELDS",
    "PARTS",
    "CachedLoader",
    "Cell",
    "CellRunner",
    "LocalExecutor",
    "Sweep",
    "SweepResult",
    "budget_tuple",
    "canonical_json",
    "error_row",
    "finished_cells",
    "make_executor",
    "method_cells",
    "run_sweep",
    "without_metadata",
]
