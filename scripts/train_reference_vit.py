"""Train (and cache) the reference ViT on cluttered digits.

Usage::

    python scripts/train_reference_vit.py            # train unless already cached
    python scripts/train_reference_vit.py --force    # retrain even if cached

The checkpoint goes to ``~/.cache/tokenreduce/reference_vit/v<version>-<hash>/``
(override the root with ``TOKENREDUCE_CACHE``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

try:
    from tokenreduce.models.reference_vit import TrainConfig, checkpoint_dir, train_reference_vit
except ImportError:  # running from a source checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from tokenreduce.models.reference_vit import TrainConfig, checkpoint_dir, train_reference_vit


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, train if needed, print the metrics as JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--force", action="store_true", help="retrain even if a checkpoint is cached")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)

    config = TrainConfig()
    out = checkpoint_dir(config)
    metrics_path = out / "metrics.json"
    if (out / "model.pt").is_file() and metrics_path.is_file() and not args.force:
        print(f"already trained: {out} (use --force to retrain)")
        metrics = json.loads(metrics_path.read_text())
    else:
        metrics = train_reference_vit(config, progress=not args.no_progress)
    summary = {k: metrics.get(k) for k in ("val_acc", "test_acc", "n_val", "n_test", "train_time_s",
                                           "total_time_s", "checkpoint")}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
