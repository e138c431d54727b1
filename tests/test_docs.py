"""The documentation's code runs as written: the method example of docs/design.md and the README's snippets."""

from __future__ import annotations

import re
from pathlib import Path

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
