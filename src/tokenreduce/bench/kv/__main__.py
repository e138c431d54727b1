"""``python -m tokenreduce.bench.kv ...``: ``bench kv`` without the CLI's other plugins (peer venvs, e.g.
kvpress's, lack timm & co.; see the package docstring)."""

from __future__ import annotations

import typer

from .cli import register_cli

if __name__ == "__main__":
    _app = typer.Typer(add_completion=False)
    register_cli(_app)
    _app()
