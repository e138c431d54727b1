"""The `tokenreduce` command line."""

from __future__ import annotations

from typer.testing import CliRunner

from tokenreduce import cli


def _app():
    cli._register_plugins()
    return cli.app


def test_list_shows_registered_methods():
    res = CliRunner().invoke(_app(), ["list", "--integration", "vit-layers"])
    assert res.exit_code == 0, res.output
    for name in ("tome", "evit", "token-transforming", "cluster", "pool", "random"):
        assert name in res.output


def test_bench_vit_is_registered():
    res = CliRunner().invoke(_app(), ["bench", "vit", "--help"])
    assert res.exit_code == 0, res.output
    assert "--keep" in res.output and "--methods" in res.output


def test_convert_gemma_is_registered():
    res = CliRunner().invoke(_app(), ["convert", "gemma", "--help"])
    assert res.exit_code == 0, res.output
