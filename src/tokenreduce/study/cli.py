"""``tokenreduce study <name>``: run one study (:mod:`tokenreduce.study`) and print its verdicts."""

from __future__ import annotations

from typing import Any

__all__ = ["register_cli"]


def register_cli(app: Any) -> None:
    import typer

    from ..bench.sweep.options import sweep_options

    o = sweep_options()

    @app.command("study")
    def study(
        name: str = typer.Argument(..., help="distraction | hallucination | train-reduction | reasoning-length | rho1"),
        smoke: bool = o.smoke,
        out: str = typer.Option(None, help="output directory (default results/study/<name>[/smoke])"),
        set_: list[str] = typer.Option([], "--set", help="override a configuration field, e.g. --set "
                                       "lengths=1024,2048 --set n_prompts=64 (defaults: the full study)"),
        executor: str = o.executor,
        address: str = o.address,
        resume: bool = o.resume,
        report_only: bool = typer.Option(False, help="run nothing: the report from the cells already finished in "
                                         "<out>/items.jsonl (e.g. of a run still going)"),
    ) -> None:
        """Run a study: hypothesis, paired test against the unreduced model, one verdict line per part
        (results/study/<name>/: items.jsonl, summary.txt/json, plot.png, report.html)."""
        from .registry import get_study, parse_overrides
        from .run import run_study

        # a bad name, field or value, or a missing model: one line and exit code 2 (tokenreduce.cli.main)
        overrides = parse_overrides(get_study(name).config, set_)
        run = run_study(name, smoke=smoke, out=out, overrides=overrides, executor=executor, address=address,
                        resume=resume, report_only=report_only)
        for p in run.result.parts:
            typer.echo(f"[{p.name}] {p.verdict.line}")
        for n in run.result.notes:
            typer.echo(f"note: {n}")
        typer.echo(f"report: {run.paths['html']}")
