"""The ``tokenreduce`` command: ``list``, ``demo``, ``bench <target>``, ``train <model>``, ``convert <model>``.

Benchmarks, trainers and converters live in their own modules; each exposes ``register_cli(app)`` and is
listed below, so this file stays a table of contents.
"""

from __future__ import annotations

import importlib
import importlib.util

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Token reduction for vision, language and multimodal transformers.")
bench_app = typer.Typer(no_args_is_help=True, help="Run a benchmark (JSONL + plots + HTML report).")
train_app = typer.Typer(no_args_is_help=True, help="Train a reference model (cached in ~/.cache/tokenreduce).")
convert_app = typer.Typer(no_args_is_help=True, help="Convert a packaged pretrained model to a cached checkpoint.")
app.add_typer(bench_app, name="bench")
app.add_typer(train_app, name="train")
app.add_typer(convert_app, name="convert")

# module -> the sub-app it registers commands on
_PLUGINS = {
    "tokenreduce.bench.vit": bench_app,
    "tokenreduce.bench.kv": bench_app,
    "tokenreduce.bench.prompt": bench_app,
    "tokenreduce.bench.encoder": bench_app,
    "tokenreduce.bench.vlm": bench_app,
    "tokenreduce.models.vit.cli": train_app,
    "tokenreduce.models.vlm.cli": train_app,
    "tokenreduce.models.gemma.cli": convert_app,
}


_registered = False


def _register_plugins() -> None:
    """Import the plugin modules that exist and let them add their commands (once)."""
    global _registered
    if _registered:
        return
    _registered = True
    for mod, sub in _PLUGINS.items():
        if importlib.util.find_spec(mod) is None:  # a capability not built yet
            continue
        m = importlib.import_module(mod)
        if hasattr(m, "register_cli"):
            m.register_cli(sub)


@app.command("list")
def list_methods(integration: str = typer.Option(None, help="Only this integration point, e.g. vit-layers")) -> None:
    """List the registered methods: name, modality, integration point, paper."""
    from rich.console import Console
    from rich.table import Table

    import tokenreduce as tr

    rows = tr.methods(integration)
    table = Table(title=f"tokenreduce methods ({len(rows)})")
    for col in ("name", "modality", "integration", "paper"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["name"], r["modality"], r["integration"], r["paper"])
    Console().print(table)


@app.command()
def demo(
    out: str = typer.Option("results/demo", help="Output directory for the JSONL/PNG/HTML report"),
    quick: bool = typer.Option(False, help="Fewer images and repeats (a smoke run)"),
) -> None:
    """Train (once, cached) the reference ViT and benchmark the vision methods on it."""
    from .bench.vit import run_vit_bench

    run_vit_bench(
        methods=["tome", "evit", "token-transforming", "cluster", "pool", "random"],
        keeps=[1.0, 0.5] if quick else [1.0, 0.5, 0.25],
        out=out,
        n_images=200 if quick else 500,
        repeats=3 if quick else 5,
        train_if_missing=True,
    )


def main() -> None:
    _register_plugins()
    app()


if __name__ == "__main__":
    main()
