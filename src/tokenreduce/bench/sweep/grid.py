"""The grid of a benchmark that measures methods at budgets against the unreduced model (bench vit, vlm,
encoder, and the diffusion bench): which cells, per part.

* ``parts="accuracy"``: one cell per (method, budget) without wall-clock: they run in parallel anywhere;
* ``parts="all"``: one timing cell per method holding all its budgets: accuracy, then one interleaved timing
  group (the unreduced model, each budget, each zero-overhead limit), so its ratios share one node and run;
* ``parts="timing"``: one timing cell per method over the budgets whose accuracy cell is finished; it needs
  those cells (``Cell.needs``) and adds the timing columns to their rows.

The unreduced model is one more cell (method ``"none"``, keep 1.0); ``time_base=True`` times it too (alone)
in the parts that time.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from .cell import Cell

__all__ = ["PARTS", "budget_tuple", "method_cells"]

PARTS = ("all", "accuracy", "timing")


def budget_tuple(keep: Any) -> tuple[Any, ...]:
    """A cell's budgets as a tuple (an accuracy cell holds one)."""
    return tuple(keep) if isinstance(keep, (tuple, list)) else (keep,)


def method_cells(bench: str, model: str, methods: Sequence[str], budgets: Callable[[str], Sequence[Any]],
                 parts: str, accuracy: Mapping[str, Any], timing: Mapping[str, Any],
                 method_kw: Mapping[str, Mapping[str, Any]], finished: Collection[str] = (),
                 time_base: bool = False) -> list[Cell]:
    """The cells of ``methods`` at ``budgets(method)`` for ``parts`` (see the module docstring).
    ``accuracy``/``timing``: the settings each kind of cell depends on (a timing cell gets both);
    ``method_kw[method]`` goes into that method's settings; ``finished``: ids of the finished cells (the
    timing part runs over those)."""
    timed = {**accuracy, **timing}
    base = Cell(bench, model, "none", 1.0, dict(accuracy))
    if time_base and parts == "all":
        base = Cell(bench, model, "none", 1.0, timed, timing=True)
    elif time_base and parts == "timing":
        base = Cell(bench, model, "none", 1.0, {**timed, "part": "timing"}, timing=True, needs=(base.id,))
    cells = [base]
    for m in methods:
        s = {**accuracy, "method_kw": dict(method_kw.get(m, {}))}
        acc = [Cell(bench, model, m, b, s) for b in budgets(m)]
        if parts == "accuracy":
            cells += acc
        elif parts == "all" and acc:
            cells.append(Cell(bench, model, m, tuple(budgets(m)), {**s, **timing}, timing=True))
        elif parts == "timing":
            have = [c for c in acc if c.id in finished]
            if have:
                cells.append(Cell(bench, model, m, tuple(c.keep for c in have), {**s, **timing, "part": "timing"},
                                  timing=True, needs=tuple(c.id for c in have)))
    return cells
