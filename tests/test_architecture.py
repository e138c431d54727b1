"""The package's layer order (docs/design.md, "Layers") and the absence of import cycles, read from the source
with ``ast`` (every import counts, also those inside functions): a module may import only its own component
and the components its layer lists."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "tokenreduce"

#: component -> the components it may import (besides itself). Components are the first dotted part under
#: ``tokenreduce`` (a subpackage or a top-level module); "tokenreduce" is the package's own __init__ (the API).
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "_paths": set(),
    "data": {"_paths"},
    "accounting": set(),
    "registry": {"core"},
    "methods": {"core", "registry", "_paths"},  # _paths: learned methods load their trained parts
    "adapters": {"core", "registry", "methods", "accounting"},
    "api": {"core", "registry", "methods", "adapters", "accounting"},
    "compress": {"core", "registry", "methods", "adapters", "accounting"},
    "pipelines": {"core", "registry", "methods", "adapters", "accounting", "api", "compress"},
    "tokenreduce": {"core", "registry", "methods", "adapters", "accounting", "api", "compress", "pipelines"},
}
_API = {"tokenreduce", "api", "compress", "pipelines"}
ALLOWED["models"] = {"core", "registry", "methods", "adapters", "accounting", "_paths", "data"} | _API
ALLOWED["bench"] = ALLOWED["models"] | {"models"}
ALLOWED["study"] = ALLOWED["bench"] | {"bench"}
ALLOWED["cli"] = ALLOWED["study"] | {"study"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of the tokenreduce modules ``path`` imports (relative imports resolved)."""
    mod = _module_name(path)
    pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "tokenreduce"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "tokenreduce":
                continue
            out.add(target)
            for a in node.names:  # `from . import x` / `from .pkg import submodule`
                cand = f"{target}.{a.name}"
                if (SRC.parent / Path(*cand.split("."))).with_suffix(".py").exists() or \
                        (SRC.parent / Path(*cand.split("."))).is_dir():
                    out.add(cand)
    return out


def _component(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "tokenreduce"


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}
GRAPH = {m: {i for i in _imports(p) if i in MODULES and i != m} for m, p in MODULES.items()}


def test_every_component_has_a_layer():
    missing = sorted({_component(m) for m in MODULES} - set(ALLOWED))
    assert not missing, f"components without a layer in ALLOWED: {missing} (add them to docs/design.md too)"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_follow_the_layer_order(module):
    comp = _component(module)
    bad = sorted(i for i in GRAPH[module] if _component(i) != comp and _component(i) not in ALLOWED[comp])
    assert not bad, f"{module} ({comp}) imports {bad}; {comp} may import only {sorted(ALLOWED[comp])}"


def test_no_import_cycles():
    """Tarjan's strongly connected components over module -> imported module (package __init__ files are
    nodes like any module; importing ``a.b`` is an edge to ``a.b``, not to ``a``)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checker_sees_relative_and_function_level_imports(tmp_path):
    """The parser resolves relative imports, including those inside functions (they count too)."""
    imps = _imports(SRC / "adapters" / "vit.py")
    assert "tokenreduce.adapters.blocks" in imps and "tokenreduce.accounting.flops" in imps
