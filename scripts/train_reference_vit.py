"""Train (and cache) the reference ViT on cluttered digits.

Usage::

    python scripts/train_reference_vit.py                # train unless already cached
    python scripts/train_reference_vit.py --force        # retrain even if cached
    python scripts/train_reference_vit.py --threads 1    # faster than 2 on a busy 2-core machine

Same as ``tokenreduce train vit``. The checkpoint goes to
``~/.cache/tokenreduce/reference_vit/v<version>-<config hash>/`` (override the root
with ``TOKENREDUCE_CACHE``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

try:
    from tokenreduce.models.vit import TrainConfig, train_or_load_metrics
except ImportError:  # running from a source checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from tokenreduce.models.vit import TrainConfig, train_or_load_metrics


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, train if needed, print the metrics summary as JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--force", action="store_true", help="retrain even if a checkpoint is cached")
    parser.add_argument("--threads", type=int, default=TrainConfig.num_threads, help="torch threads (default 2; speed only, not part of the checkpoint hash)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    config = TrainConfig(num_threads=args.threads)
    print(json.dumps(train_or_load_metrics(config, force=args.force, progress=not args.no_progress), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
