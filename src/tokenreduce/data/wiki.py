"""Real English prose that installs offline: the Wikipedia articles shipped in gensim's test data.

gensim 4.4.0 bundles a shortened dump of the first English Wikipedia pages
(``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``, 1.7 MB compressed, 6.1 MB of XML):
107 articles in the main namespace (Anarchism, Autism, Albedo, Alabama, Achilles, Abraham Lincoln, ...) once
redirects are dropped. Text: Wikipedia contributors, CC BY-SA (https://en.wikipedia.org/wiki/Wikipedia:Copyrights);
gensim is LGPL-2.1. :func:`wiki_articles` strips the wiki markup with gensim's ``filter_wiki`` and keeps the
paragraphs of running prose (no headings, lists, tables, captions): about 2.9 MB of clean English.
"""

from __future__ import annotations

import bz2
import hashlib
import json
import os
import re
from dataclasses import dataclass
from functools import cache

from .._paths import cache_dir
from .text import gensim_test_data

__all__ = ["WIKI_DUMP", "WIKI_VERSION", "WikiArticle", "clean_paragraphs", "split_articles", "wiki_articles"]

WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
#: bump when the cleaning changes (cached models trained on the text key on it)
WIKI_VERSION = 1

_MARKUP = [
    (re.compile(r"'{2,}"), ""),  # bold / italics
    (re.compile(r"\[\[[^\]|]*\|([^\]]*)\]\]"), r"\1"),  # a leftover [[link|text]]
    (re.compile(r"[\[\]{}]"), ""),
    (re.compile(r"&[a-z]+;"), " "),  # entities (&nbsp; ...)
    (re.compile(r"\(\s*[,;]?\s*\)"), ""),  # parentheses emptied by the removed templates
    (re.compile(r"\s+([,.;:])"), r"\1"),
    (re.compile(r"([,;])\s*(?=[,;])"), ""),
    (re.compile(r"\s{2,}"), " "),
]
_SKIP = ("=", "*", "#", ":", ";", "|", "!", "{", "}", "<", "Category:", "File:", "Image:", "thumb")


@dataclass(frozen=True)
class WikiArticle:
    title: str
    paragraphs: tuple[str, ...]

    @property
    def text(self) -> str:
        return "\n".join(self.paragraphs)


def clean_paragraphs(wikitext: str, min_chars: int = 120) -> tuple[str, ...]:
    """The prose paragraphs of ``wikitext`` after gensim's ``filter_wiki`` (markup, templates, references and
    links removed): headings, list items, table rows and lines shorter than ``min_chars`` are dropped, as are
    lines where fewer than 85% of the characters are letters, spaces or common punctuation."""
    from gensim.corpora.wikicorpus import filter_wiki

    out = []
    for line in filter_wiki(wikitext).splitlines():
        line = line.strip()
        if len(line) < min_chars or line.startswith(_SKIP):
            continue
        for pattern, repl in _MARKUP:
            line = pattern.sub(repl, line)
        line = line.strip()
        plain = sum(c.isalpha() or c in " ,.;:'\"()-%" or c.isdigit() for c in line)
        if len(line) >= min_chars and plain >= 0.85 * len(line) and line[-1] in '.!?"':
            out.append(line)
    return tuple(out)


def _extract() -> list[WikiArticle]:
    from gensim.corpora.wikicorpus import extract_pages

    path = gensim_test_data() / WIKI_DUMP
    if not path.is_file():
        raise FileNotFoundError(f"the Wikipedia sample of gensim's test data is missing: {path}")
    out = []
    with bz2.open(path) as f:
        for title, text, _ in extract_pages(f, filter_namespaces=("0",)):
            if text.lstrip().lower().startswith("#redirect"):
                continue
            paras = clean_paragraphs(text)
            if paras:
                out.append(WikiArticle(title, paras))
    return out


@cache
def wiki_articles() -> tuple[WikiArticle, ...]:
    """The articles of the bundled dump with at least one prose paragraph, in dump order (needs gensim).
    Extracted once (seconds) and kept as JSON in ``~/.cache/tokenreduce/data/wiki-v<WIKI_VERSION>.json``."""
    path = cache_dir("data") / f"wiki-v{WIKI_VERSION}.json"
    if path.is_file():
        return tuple(WikiArticle(t, tuple(p)) for t, p in json.loads(path.read_text()))
    arts = _extract()
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps([[a.title, list(a.paragraphs)] for a in arts]))
    tmp.replace(path)
    return tuple(arts)


def split_articles(articles: tuple[WikiArticle, ...], fractions: dict[str, float]) -> dict[str, list[WikiArticle]]:
    """Disjoint splits by whole article: the articles ordered by a hash of their title, then cut so that each
    split gets about its fraction of the characters (``fractions`` in order, summing to at most 1; the rest of
    the articles is unused). The same titles give the same splits on every machine."""
    total = sum(fractions.values())
    if not fractions or any(f <= 0 for f in fractions.values()) or total > 1 + 1e-9:
        raise ValueError(f"fractions={fractions!r} are invalid: positive and summing to at most 1")
    order = sorted(articles, key=lambda a: hashlib.sha256(a.title.encode()).hexdigest())
    chars = sum(len(a.text) for a in order)
    out: dict[str, list[WikiArticle]] = {name: [] for name in fractions}
    names = list(fractions)
    bounds, acc = [], 0.0
    for name in names:
        acc += fractions[name]
        bounds.append(acc * chars)
    seen, i = 0, 0
    for a in order:
        mid = seen + len(a.text) / 2  # an article goes where its middle falls
        while i < len(names) and mid > bounds[i]:
            i += 1
        if i == len(names):
            break
        out[names[i]].append(a)
        seen += len(a.text)
    return out
