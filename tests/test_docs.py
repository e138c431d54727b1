"""The documentation's code runs as written: the method example of docs/design.md and the README's snippets."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import tokenreduce as tr
from tests import tiny
from tokenreduce.registry import METHODS

ROOT = Path(__file__).resolve().parents[1]


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.DOTALL)


def test_design_doc_method_example_registers_and_runs():
    """'Adding a method' in docs/design.md: the example registers, runs on a ViT and keeps its budget."""
    block = next(b for b in _python_blocks(ROOT / "docs" / "design.md") if "@register(" in b)
    try:
        exec(compile(block, "docs/design.md", "exec"), {})  # noqa: S102 (the documentation's own example)
        assert "norm-prune" in [r["name"] for r in tr.methods("vit")]
        model = tiny.timm_vit(classes=5)
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            ref = model(x)
            with tr.apply(model, "norm-prune", keep=1.0):
                torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
            with tr.apply(model, "norm-prune", keep=0.6) as h:
                model(x)
        assert abs(h.stats.keep_achieved - 0.6) < 0.04
    finally:
        METHODS.pop("norm-prune@vit-layers", None)


def _readme_blocks() -> list[str]:
    return _python_blocks(ROOT / "README.md")


def test_readme_snippets_without_a_cached_model_run_as_written(capsys):
    blocks = [b for b in _readme_blocks() if "load_gemma" not in b]
    assert len(blocks) >= 2
    for b in blocks:
        exec(compile(b, "README.md", "exec"), {})  # noqa: S102 (the README's own snippets)
    out = capsys.readouterr().out
    assert "torch.Size([2, 9, 64])" in out  # CLS + half of the 16 reducible tokens


@pytest.mark.slow
def test_readme_gemma_snippet_runs_as_written(capsys):
    from tokenreduce.models.gemma import gemma_cache_ready

    if not gemma_cache_ready():
        pytest.skip("Gemma 3 270M is not converted (tokenreduce convert gemma)")
    block = next(b for b in _readme_blocks() if "load_gemma" in b)
    exec(compile(block, "README.md", "exec"), {})  # noqa: S102
    out = capsys.readouterr().out
    assert "31415" in out.splitlines()[0]  # the pass key, from a quarter of the KV cache
