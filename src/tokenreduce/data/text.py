"""Real English text shipped with gensim's test data (no downloads): the Lee news corpus.

``lee_documents()`` gives the 300 background documents of Lee et al. (2005) (``lee_background.cor``);
``lee_test_documents()`` the 50 documents with human similarity judgements (``lee.cor``).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

__all__ = ["english_text", "gensim_test_data", "lee_documents", "lee_similarity_matrix", "lee_test_documents"]


def gensim_test_data() -> Path:
    """Directory of gensim's bundled test data (needs ``pip install gensim``)."""
    import importlib.util

    # locate the package without importing it (importing gensim takes seconds; only its data files are read)
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:  # pragma: no cover - depends on the environment
        raise ImportError("real text data needs gensim: pip install 'tokenreduce[llm]' (gensim==4.4.0)")
    path = Path(next(iter(spec.submodule_search_locations))) / "test" / "test_data"
    if not path.is_dir():
        raise FileNotFoundError(f"gensim test data not found at {path}")
    return path


def _read_lines(name: str) -> tuple[str, ...]:
    text = (gensim_test_data() / name).read_text(encoding="latin-1")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


@cache
def lee_documents() -> tuple[str, ...]:
    """The 300 Lee background news documents (one string each)."""
    return _read_lines("lee_background.cor")


@cache
def lee_test_documents() -> tuple[str, ...]:
    """The 50 Lee documents that come with human pairwise similarity judgements."""
    return _read_lines("lee.cor")


def lee_similarity_matrix():
    """The 50x50 matrix of mean human similarity judgements for :func:`lee_test_documents` (numpy array).

    gensim ships it as ``similarities0-1.txt`` (Lee, Pincombe & Welsh 2005)."""
    import numpy as np

    path = gensim_test_data() / "similarities0-1.txt"
    if not path.exists():
        raise FileNotFoundError(f"Lee similarity judgements not found at {path}")
    return np.loadtxt(path)


def english_text(min_chars: int, start: int = 0) -> str:
    """Concatenate Lee background documents from ``start`` (cyclically) until at least ``min_chars``."""
    docs = lee_documents()
    out: list[str] = []
    n = 0
    i = start
    while n < min_chars:
        d = docs[i % len(docs)]
        out.append(d)
        n += len(d) + 1
        i += 1
    return " ".join(out)
