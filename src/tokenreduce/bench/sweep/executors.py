"""Executors: where the cells of a sweep run. ``local`` runs them one after the other in this process (the
benchmarks' behaviour before sweeps); ``ray`` (:mod:`.ray_executor`) spreads them over a Ray cluster."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from ..args import check_choice
from .cell import Cell
from .runner import CellRunner
from .spec import Finished, Sweep

__all__ = ["EXECUTORS", "Executor", "LocalExecutor", "make_executor"]

EXECUTORS = ("local", "ray")


class Executor(Protocol):
    def run(self, sweep: Sweep, cells: Sequence[Cell], finished: Finished) -> None:
        """Run ``cells``; call ``finished(cell, rows)`` in the driver as each one completes."""


class LocalExecutor:
    """In this process, in grid order: the model is loaded once (the sweep's loader keeps it)."""

    def run(self, sweep: Sweep, cells: Sequence[Cell], finished: Finished) -> None:
        runner = CellRunner(sweep.load, sweep.run, "local")
        for cell in cells:
            finished(cell, runner(cell))


def make_executor(name: str, address: str | None = None) -> Executor:
    """The executor ``name`` (``local`` or ``ray``); ``address`` (Ray only): an existing cluster. Raises a
    one-line error when Ray is missing or the address unreachable."""
    check_choice(name, EXECUTORS, "--executor")
    if name == "local":
        if address:
            raise ValueError(f"--address {address}: an address is for --executor ray (local runs in this process)")
        return LocalExecutor()
    from .ray_executor import RayExecutor

    return RayExecutor(address)
