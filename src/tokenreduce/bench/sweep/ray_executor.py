"""``--executor ray``: the cells of a sweep on a Ray cluster (``ray.init()`` on this machine by default, or the
cluster at ``--address``).

* **Actors keep the model loaded.** Each worker is a Ray actor holding a :class:`~.runner.CellRunner`; it
  loads a model once and runs cell after cell on it (``max_restarts``/``max_task_retries``: a worker killed,
  e.g. out of memory, is restarted and its cell retried once; a cell still failing becomes an error row).
* **Resources.** An accuracy actor reserves ``cpus_per_cell`` CPUs (the cells' torch threads) and, for
  ``--device cuda``, one GPU, so a node runs as many as it has CPUs (GPUs) for.
* **Timing cells run alone on their node.** They run in a second phase, after every accuracy cell has
  finished and its actors are gone, on actors that each hold the node's one ``timing_slot`` resource: at most
  one timing cell per node at a time. A local cluster gets ``{"timing_slot": 1}``; on a cluster give every
  node that may time one (``ray start ... --resources='{"timing_slot": 1}'``). Each timing cell forms its
  ratios from its own interleaved rounds, so a ratio never mixes nodes or runs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from .cell import Cell
from .runner import CellRunner, error_row, stamp, utc_now
from .spec import Finished, Sweep

__all__ = ["RAY_INSTALL", "TIMING_RESOURCE", "RayExecutor", "check_reachable", "import_ray", "worker_start_error"]

TIMING_RESOURCE = "timing_slot"
RAY_INSTALL = "pip install 'tokenreduce[ray]'"
MAX_RETRIES = 1


def import_ray() -> Any:
    """The ``ray`` module, or a one-line error naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise RuntimeError(f"--executor ray needs Ray, which is not installed: {RAY_INSTALL} "
                           "(ray==2.58.0)") from None
    return ray


def worker_start_error(e: BaseException) -> str:
    """One line for an actor that failed in its constructor (on a cluster: usually a node whose tokenreduce
    is missing, older, or lacks a dependency)."""
    import re

    from ..meta import git_commit, package_version

    found = re.findall(r"\b(\w+(?:Error|Exception): [^\n]+)", str(e))
    detail = found[-1] if found else str(e).strip().splitlines()[-1]
    return (f"a Ray worker could not start ({detail[:200]}): every node needs this tokenreduce "
            f"({package_version('tokenreduce')}, commit {(git_commit()['commit'] or 'unknown')[:10]}) importable, with "
            f"its dependencies ({RAY_INSTALL}) and the models its cells load (docs/sweeps.md)")


class _Worker:
    """The actor: one :class:`CellRunner` (hence one loaded model) per actor process."""

    def __init__(self, load: Any, run: Any) -> None:
        self.runner = CellRunner(load, run, "ray")

    def run(self, cell: Cell) -> list[dict[str, Any]]:
        return self.runner(cell)


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """A TCP connection to ``host:port`` (also ``ray://host:port``) within ``timeout`` seconds, else a one-line
    error (``ray.init`` itself retries for minutes). ``auto`` and addresses without a port are left to Ray."""
    import socket

    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise RuntimeError(f"--address {address}: no Ray cluster reachable there ({e.strerror or e}); start one with "
                           "`ray start --head` and pass the address it prints") from None


class RayExecutor:
    """Connects at creation (so a bad address fails before anything is written); shuts down only the Ray
    instance it started itself."""

    def __init__(self, address: str | None = None) -> None:
        self.ray = ray = import_ray()
        self.address = address
        self.started = False
        if ray.is_initialized():
            return
        kw: dict[str, Any] = {"logging_level": logging.WARNING, "include_dashboard": False,
                              "configure_logging": True, "log_to_driver": True}
        if address:
            check_reachable(address)
            try:
                ray.init(address=address, **kw)
            except Exception as e:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError, ...
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise RuntimeError(f"--address {address}: no Ray cluster reachable there ({first[:200]}); start one "
                                   "with `ray start --head` and pass the address it prints") from None
        else:
            ray.init(resources={TIMING_RESOURCE: 1}, **kw)
        self.started = True

    def close(self) -> None:
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()
        self.started = False

    def _timing_nodes(self) -> int:
        return sum(1 for n in self.ray.nodes() if n.get("Alive") and n.get("Resources", {}).get(TIMING_RESOURCE))

    def run(self, sweep: Sweep, cells: Sequence[Cell], finished: Finished) -> None:
        accuracy = [c for c in cells if not c.timing]
        timing = [c for c in cells if c.timing]
        n_timing = self._timing_nodes() if timing else 0
        if timing and not n_timing:
            raise RuntimeError(f"{len(timing)} timing cells need a node with the {TIMING_RESOURCE!r} resource and the "
                               f"cluster at {self.address} has none: start each node that may time with `ray start "
                               f"... --resources='{{\"{TIMING_RESOURCE}\": 1}}'` (or run --parts accuracy)")
        try:
            cpus, gpus = sweep.cpus_per_cell, sweep.gpus_per_cell
            per = {"num_cpus": cpus, "num_gpus": gpus}
            if accuracy:
                total = self.ray.cluster_resources()
                n = int(total.get("CPU", 1.0) // cpus) if cpus else len(accuracy)
                if gpus:
                    n = min(n, int(total.get("GPU", 0.0) // gpus))
                if n < 1:
                    raise RuntimeError(f"no node of the cluster at {self.address or 'this machine'} has {cpus} CPU(s)"
                                       f"{f' and {gpus} GPU(s)' if gpus else ''} for a cell")
                self._phase(sweep, accuracy, finished, min(len(accuracy), n), per)
            if timing:
                self._phase(sweep, timing, finished, min(n_timing, len(timing)),
                            {**per, "resources": {TIMING_RESOURCE: 1}})
        finally:
            self.close()

    def _phase(self, sweep: Sweep, cells: Sequence[Cell], finished: Finished, n_actors: int,
               options: dict[str, Any]) -> None:
        """Run ``cells`` on ``n_actors`` actors, each fed its next cell when it finishes one; the actors are
        killed at the end (their CPUs and timing slots freed for the next phase)."""
        ray = self.ray
        remote = ray.remote(_Worker).options(max_restarts=MAX_RETRIES, max_task_retries=MAX_RETRIES, **options)

        def spawn() -> Any:
            return remote.remote(sweep.load, sweep.run)

        actors = [spawn() for _ in range(n_actors)]
        queue = list(cells)
        pending: dict[Any, tuple[int, Cell]] = {}

        def submit(slot: int) -> None:
            if queue:
                cell = queue.pop(0)
                pending[actors[slot].run.remote(cell)] = (slot, cell)

        try:
            for slot in range(n_actors):
                submit(slot)
            while pending:
                [ref], _ = ray.wait(list(pending), num_returns=1)
                slot, cell = pending.pop(ref)
                try:
                    rows = ray.get(ref)
                except ray.exceptions.RayTaskError as e:  # raised outside a cell: the model did not load
                    cause = getattr(e, "cause", None)
                    raise (cause if isinstance(cause, Exception) else RuntimeError(str(e))) from None
                except ray.exceptions.RayActorError as e:  # the worker died beyond its restarts: a fresh one
                    if getattr(e, "actor_init_failed", False):  # no worker can start: the nodes' install differs
                        raise RuntimeError(worker_start_error(e)) from None
                    rows = stamp(cell, [error_row(cell, e)], "ray", utc_now(), 0.0)
                    ray.kill(actors[slot], no_restart=True)
                    actors[slot] = spawn()
                finished(cell, rows)
                submit(slot)
        finally:
            for a in actors:
                ray.kill(a, no_restart=True)
