"""Error-message helpers shared by every layer (no dependency on the rest of the package)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["suggest"]


def suggest(name: str, choices: Iterable[str]) -> str:
    """``" (did you mean 'a', 'b'?)"`` for the close matches of ``name`` among ``choices``, else ``""``."""
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
