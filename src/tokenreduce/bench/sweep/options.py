"""The command-line options every sweeping benchmark shares (``--executor``, ``--address``, ``--resume``,
``--smoke``, ``--device``), declared once: ``o = sweep_options()`` in a ``register_cli``, then
``executor: str = o.executor`` and so on in the command's signature."""

from __future__ import annotations

from types import SimpleNamespace

__all__ = ["sweep_options"]


def sweep_options() -> SimpleNamespace:
    import typer

    return SimpleNamespace(
        executor=typer.Option("local", help="local (in this process) | ray (a Ray cluster; docs/sweeps.md)"),
        address=typer.Option(None, help="with --executor ray: the address of a running cluster (`ray start --head` "
                                        "prints it); default: a Ray instance on this machine"),
        resume=typer.Option(True, "--resume/--no-resume",
                            help="skip the cells whose rows are already in the results file (crash, new method)"),
        smoke=typer.Option(False, help="tiny random-weight models, a handful of cells: the whole path in seconds"),
        device=typer.Option("cpu", help="cpu | cuda (GPU time measured with CUDA events)"),
    )
