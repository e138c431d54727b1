"""Error-message helpers shared by every layer (no dependency on the rest of the package)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["check_int", "suggest"]


def suggest(name: str, choices: Iterable[str]) -> str:
    """``" (did you mean 'a', 'b'?)"`` for the close matches of ``name`` among ``choices``, else ``""``."""
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def check_int(name: str, value: object, minimum: int = 1, meaning: str = "") -> int:
    """An int >= ``minimum`` (bools rejected), or a ValueError naming the value and what is accepted."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} is invalid: an int >= {minimum}{f' ({meaning})' if meaning else ''}")
    return value
