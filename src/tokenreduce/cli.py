"""The ``tokenreduce`` command: ``list``, ``demo``, ``bench <target>``, ``train <model>``, ``convert <model>``.

Benchmarks, trainers and converters live in their own modules; each exposes ``register_cli(app)`` and is
listed below, so this file stays a table of contents.
"""

from __future__ import annotations

import importlib
import importlib.util

import typer

# Help texts are plain text: they hold brackets ("[0, 1]", "<name>[/smoke]") that rich markup would parse.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"show_default": True}, rich_markup_mode=None,
                  help="Token reduction for vision, language and multimodal transformers.")
_SUB = {"no_args_is_help": True, "context_settings": {"show_default": True}, "rich_markup_mode": None}
bench_app = typer.Typer(help="Run a benchmark (JSONL + plots + HTML report).", **_SUB)
train_app = typer.Typer(help="Train a reference model (cached in ~/.cache/tokenreduce).", **_SUB)
convert_app = typer.Typer(help="Convert a packaged pretrained model to a cached checkpoint.", **_SUB)
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
    "tokenreduce.bench.diffusion": bench_app,
    "tokenreduce.models.vit.cli": train_app,
    "tokenreduce.models.vlm.cli": train_app,
    "tokenreduce.models.reasoning.cli": train_app,
    "tokenreduce.models.lm.cli": train_app,
    "tokenreduce.models.gemma.cli": convert_app,
    "tokenreduce.models.diffusion": train_app,
    "tokenreduce.study.cli": app,
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
def list_methods(
    name: str = typer.Argument(None, help="A method: show its keep meaning, knobs with defaults, presets, docstring"),
    integration: str = typer.Option(None, help="Only this integration point (vit-layers or vit, encoder-layers or "
                                    "encoder, kv-cache or kv, prompt, vlm-visual or vlm, diffusion)"),
) -> None:
    """List the registered methods (name, integration point, paper), or one method in detail."""
    from rich.console import Console
    from rich.table import Table

    import tokenreduce as tr
    from tokenreduce.registry import get_method

    console = Console(markup=False, highlight=False)  # equations hold brackets, not rich markup
    if name is not None:
        spec = get_method(name, integration)
        others = [r["integration"] for r in tr.methods() if r["name"] == name and r["integration"] != spec.integration]
        console.print(f"{spec.name} at {spec.integration} ({spec.modality}); {spec.paper}")
        if others:
            console.print(f"also registered at: {', '.join(others)} (--integration to choose)")
        console.print(f"equation: {spec.equation}")
        console.print(f"keep: {spec.keep_meaning()}")
        console.print("knobs: " + (", ".join(f"{k}={v!r}" for k, v in spec.knobs().items()) or "none"))
        for p, settings in spec.presets.items():
            console.print(f"preset {p!r}: " + ", ".join(f"{k}={v!r}" for k, v in settings.items()))
        console.print()
        console.print(spec.doc)
        return
    rows = tr.methods(integration)
    table = Table(title=f"tokenreduce methods ({len(rows)}); `tokenreduce list NAME` for one")
    for col in ("name", "integration", "presets", "paper"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["name"], r["integration"], ", ".join(r["presets"]), r["paper"])
    console.print(table)


@app.command()
def demo(
    out: str = typer.Option("results/demo", help="Output directory for the JSONL and HTML report"),
    full: bool = typer.Option(False, help="The long benchmark instead: train the reference ViT once "
                              "(25-50 minutes on 2 cores), then benchmark the vision methods on it"),
    quick: bool = typer.Option(False, help="With --full: fewer images and repeats (a smoke run)"),
) -> None:
    """Real results on real models in a few minutes: KV-cache methods and prompt compression on Gemma 3 270M,
    token merging in all-MiniLM-L6-v2 (both install as packages; Gemma converts once, about a minute)."""
    if not full:
        from .bench.demo import run_demo

        run_demo(out)
        return
    from .bench.vit import run_vit_bench
    from .models.vit import TrainConfig, checkpoint_dir

    if not (checkpoint_dir(TrainConfig()) / "model.pt").is_file():
        print("tokenreduce demo --full: training the reference ViT first (once, cached in ~/.cache/tokenreduce): "
              "about 25-50 minutes on 2 cores", flush=True)
    run_vit_bench(methods=["tome", "evit", "token-transforming", "cluster", "pool", "random"],
                  keeps=[1.0, 0.7, 0.5] if quick else [1.0, 0.8, 0.6, 0.5], out=out,
                  n_images=200 if quick else 500, repeats=3 if quick else 5, train_if_missing=True)


def main() -> None:
    """The console script: a usage error (bad name, keep, dtype, path, missing model) is one line and exit
    code 2, not a traceback; ``TOKENREDUCE_DEBUG=1`` shows the traceback."""
    import os
    import sys

    _register_plugins()
    try:
        app(standalone_mode=False)
    except (typer.Exit, SystemExit) as e:
        raise SystemExit(getattr(e, "exit_code", getattr(e, "code", 0))) from None
    except typer.Abort:
        raise SystemExit(130) from None
    except Exception as e:  # click's own usage errors print themselves; ours are ValueError/TypeError/...
        import click

        if isinstance(e, click.ClickException):
            e.show()
            raise SystemExit(e.exit_code) from None
        if os.environ.get("TOKENREDUCE_DEBUG") or not isinstance(e, (ValueError, TypeError, FileNotFoundError,
                                                                      RuntimeError, KeyError)):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"tokenreduce: error: {msg}", file=sys.stderr)
        print("(TOKENREDUCE_DEBUG=1 shows the traceback)", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
