"""Running cells in one process (the local executor, or inside a Ray actor): the model is loaded once per
process and model name, rows are stamped with the cell id and where they were computed, and an exception
inside a cell becomes an error row instead of ending the sweep."""

from __future__ import annotations

import datetime as _dt
import time
import traceback
from collections.abc import Callable
from typing import Any

from ..meta import node_info
from .cell import Cell

__all__ = ["METADATA_FIELDS", "CachedLoader", "CellRunner", "error_row", "stamp", "utc_now", "without_metadata"]

#: fields the harness adds to every row (metadata: they differ between runs of the same cell)
METADATA_FIELDS = ("cell_id", "origin")


def without_metadata(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows as a benchmark returns them (its fields only; the results file keeps the metadata)."""
    return [{k: v for k, v in r.items() if k not in METADATA_FIELDS} for r in rows]


class CachedLoader:
    """``load(model_name) -> context`` keeping the last context: cells of one model share it (a Ray actor per
    model keeps its model loaded across cells). Pickling drops the cache, so a loader holding a loaded model
    ships only its recipe to another process."""

    def __init__(self, fn: Callable[[str], Any]) -> None:
        self.fn = fn
        self._name: str | None = None
        self._ctx: Any = None

    def __call__(self, name: str) -> Any:
        if self._name != name:
            self._name, self._ctx = None, None  # free the previous model before loading the next
            self._ctx = self.fn(name)
            self._name = name
        return self._ctx

    def __getstate__(self) -> dict[str, Any]:
        return {"fn": self.fn, "_name": None, "_ctx": None}


def error_row(cell: Cell, exc: BaseException) -> dict[str, Any]:
    """The row of a cell that raised: its method, keep and shard, the error in one line, the traceback's tail,
    and ``cell_failed`` (a resumed sweep runs the cell again)."""
    keep = list(cell.keep) if isinstance(cell.keep, tuple) else cell.keep
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    row: dict[str, Any] = {"method": cell.method, "keep": keep}
    if cell.shard is not None:
        row["shard"] = cell.shard
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-3:])
    return {**row, "error": f"{type(exc).__name__}: {msg}", "cell_failed": True, "traceback": tb[-2000:]}


def stamp(cell: Cell, rows: list[dict[str, Any]], executor: str, started: str, seconds: float
          ) -> list[dict[str, Any]]:
    """``rows`` with the cell id and ``origin``: where and when they were computed (:func:`~..meta.node_info`),
    the executor, the device, the cell's seconds and its number of rows (a resumed sweep checks it)."""
    origin = {**node_info(), "executor": executor, "device": cell.settings.get("device", "cpu"),
              "started_utc": started, "seconds": seconds, "cell_rows": len(rows)}
    return [{**r, "cell_id": cell.id, "origin": origin} for r in rows]


def utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


class CellRunner:
    """Calls ``run(load(cell.model), cell)`` for each cell. An ``Exception`` inside ``run`` gives an error row
    (:func:`error_row`); one inside ``load`` propagates (no cell of that model could run). KeyboardInterrupt
    and SystemExit always propagate."""

    def __init__(self, load: Callable[[str], Any], run: Callable[[Any, Cell], list[dict[str, Any]]],
                 executor: str) -> None:
        self.load = load
        self.run = run
        self.executor = executor

    def __call__(self, cell: Cell) -> list[dict[str, Any]]:
        ctx = self.load(cell.model)
        started = utc_now()
        t0 = time.perf_counter()
        try:
            rows = list(self.run(ctx, cell))
            if not rows:
                raise RuntimeError(f"{cell!r} returned no rows")
        except Exception as e:  # noqa: BLE001 - any failure of one cell is recorded, the sweep goes on
            rows = [error_row(cell, e)]
        return stamp(cell, rows, self.executor, started, time.perf_counter() - t0)
