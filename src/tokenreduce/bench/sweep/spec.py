"""What a benchmark hands the sweep harness (:class:`Sweep`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .cell import Cell

__all__ = ["Finished", "Rows", "Sweep"]

Rows = list[dict[str, Any]]
#: an executor's callback: ``finished(cell, rows)`` in the driver as each cell completes
Finished = Callable[[Cell, Rows], None]


@dataclass
class Sweep:
    """What a benchmark hands the harness.

    ``cells``: the grid; ``load(model_name)``: the context its cells need (model, data), built once per worker
    process and model (wrap it in :class:`~tokenreduce.bench.sweep.runner.CachedLoader`); ``run(context,
    cell)``: the cell's rows, a pure function of the cell; ``meta``: extra fields of the run's header line;
    ``cpus_per_cell``: CPUs a Ray actor reserves (the cell's torch threads); ``derive(rows)``: rows computed
    from the whole grid's rows (summaries), appended after the cells' rows of a run that computed any.
    Everything but ``meta`` and ``derive`` is shipped to Ray workers, so it must pickle (module-level
    functions, or closures over picklable objects).
    """

    bench: str
    cells: Sequence[Cell]
    load: Callable[[str], Any]
    run: Callable[[Any, Cell], Rows]
    meta: dict[str, Any] = field(default_factory=dict)
    cpus_per_cell: float = 1.0
    gpus_per_cell: float = 0.0
    derive: Callable[[Rows], Rows] | None = None
