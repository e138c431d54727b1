"""Filesystem locations used by tokenreduce (model/data caches)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """Return ``~/.cache/tokenreduce/<parts>`` (override the root with ``TOKENREDUCE_CACHE``).

    The directory is created if missing.
    """
    root = Path(os.environ.get("TOKENREDUCE_CACHE", Path.home() / ".cache" / "tokenreduce"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
